"""Fixtures for the publisher tests: real sockets, in-process servers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from starlette.types import ASGIApp

from relay.publisher.agent import Agent
from relay.publisher.config import PublisherConfig
from relay.toy_backend import ToyStats, create_toy_backend

from .fake_relay import TOKEN, FakeRelay


@asynccontextmanager
async def serve(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free port in this event loop; yield its URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    config.load()
    server.lifespan = config.lifespan_class(config)
    await server.startup(sockets=[sock])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        # uvicorn's own shutdown polls every 0.1 s; tests want no grace at all.
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()
        for task in list(server.server_state.tasks):
            task.cancel()
        if server.server_state.tasks:
            await asyncio.wait(list(server.server_state.tasks), timeout=2)
        for listener in server.servers:
            await listener.wait_closed()
        sock.close()


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait (polling) until ``predicate()`` holds, for state outside the fake
    relay such as the toy backend's counters."""
    async with asyncio.timeout(within):
        while not predicate():  # the toy backend has no event to await
            await asyncio.sleep(0.005)


def free_port() -> int:
    """A port nothing listens on (for "backend down")."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Toy:
    url: str
    stats: ToyStats
    state: dict[str, bool]

    def sleep(self) -> None:
        self.state["asleep"] = True


@asynccontextmanager
async def toy_server(**options: Any) -> AsyncIterator[Toy]:
    """A toy backend with ``create_toy_backend`` options (``asleep``, ...)."""
    app = create_toy_backend(model="toy-model", **options)
    async with serve(app) as url:
        yield Toy(url, app.state.stats, app.state.toy)


@pytest.fixture
async def toy() -> AsyncIterator[Toy]:
    async with toy_server() as backend:
        yield backend


@pytest.fixture
async def relay() -> AsyncIterator[FakeRelay]:
    fake = FakeRelay()
    async with serve(fake.app) as url:
        fake.url = url
        yield fake


StartAgent = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def start_agent(relay: FakeRelay) -> AsyncIterator[StartAgent]:
    """``await start_agent(providers, **agent_kwargs)``: run an agent against
    the fake relay and wait until it registered; stopped at teardown."""
    running: list[tuple[Agent, asyncio.Task[None]]] = []

    async def start(providers: list[dict[str, Any]], *, wait: bool = True, **kwargs: Any) -> Agent:
        config = PublisherConfig.build(relay.url, TOKEN, providers)
        timings: dict[str, Any] = {
            "backoff_base": 0.05,
            "backoff_cap": 0.5,
            "idle_timeout": 2.0,
            "shutdown_grace": 2.0,
            "wake_poll_interval": 0.02,
            "health_timeout": 1.0,
        }
        timings.update(kwargs)
        agent = Agent(config, **timings)
        task = asyncio.create_task(agent.run())
        running.append((agent, task))
        if wait:
            async with asyncio.timeout(5):
                await agent.registered.wait()
        return agent

    yield start
    for agent, task in running:
        agent.abort()
        await asyncio.wait([task], timeout=10)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


def provider(toy_url: str, name: str = "toy", **extra: Any) -> dict[str, Any]:
    """A provider entry in file syntax pointing at the toy backend."""
    return {"name": name, "url": toy_url, "model": "toy-model", **extra}


@pytest.fixture(autouse=True)
def _quiet_aiohttp() -> None:
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
