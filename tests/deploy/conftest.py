"""Fixtures of the deployment tests: a toy model server and a real publisher
agent, in the test's event loop; the replicas, Redis, Sentinels and nginx
are real processes (tests/support/procs.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import uvicorn

from relay.publisher import Agent, PublisherConfig
from relay.toy_backend import create_toy_backend
from tests.support.procs import free_port


@pytest.fixture
async def toy_backend() -> AsyncIterator[str]:
    """The toy OpenAI server on a free loopback port; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_toy_backend(model="toy-model"),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(10):
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def publishing(relay_url: str, name: str, backend_url: str) -> AsyncIterator[Agent]:
    """The real publisher agent serving ``name`` from ``backend_url``,
    registered on ``relay_url`` (a replica, or the load balancer)."""
    config = PublisherConfig.build(
        relay_url,
        "unused-with-no-auth",
        [{"name": name, "url": backend_url, "model": "toy-model", "maxConcurrency": 64}],
    )
    agent = Agent(config, backoff_base=0.1, backoff_cap=1.0, shutdown_grace=5)
    task = asyncio.create_task(agent.run(), name="publisher")
    try:
        async with asyncio.timeout(15):
            await agent.registered.wait()
        yield agent
    finally:
        await asyncio.wait_for(agent.stop(), 15)
        await task
