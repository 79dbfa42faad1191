"""A relay replica served by uvicorn inside the test's event loop, on a
real socket (SSE needs one: httpx's ASGI transport buffers whole responses)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn

from relay.app import create_app
from relay.auth import Authenticator
from relay.config import Settings
from relay.connections import Clients
from relay.service import Clock, Relay
from tests.support.procs import free_port


@contextlib.asynccontextmanager
async def serve_replica(
    settings: Settings,
    clients: Clients,
    *,
    auth: Authenticator | None = None,
    clock: Clock | None = None,
) -> AsyncIterator[tuple[str, Relay]]:
    kwargs = {"clock": clock} if clock else {}
    app = create_app(settings, clients=clients, auth=auth or Authenticator.no_auth(), **kwargs)
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
        await asyncio.sleep(0.01)
    relay: Relay = app.state.relay
    try:
        yield f"http://127.0.0.1:{port}", relay
    finally:
        relay.begin_drain()
        server.should_exit = True
        await asyncio.wait_for(task, 15)
