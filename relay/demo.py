"""``relay serve --demo``: a toy backend and a publisher for it, in-process,
so that a newcomer's first ``curl`` answers without a model server.

The toy model is published as ``demo``; it echoes the last user message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from typing import Any

import uvicorn

from relay.auth import Authenticator
from relay.config import Settings

log = logging.getLogger("relay.demo")

DEMO_MODEL = "demo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, settings: Settings, auth: Authenticator) -> None:
        self.settings = settings
        self.auth = auth
        self._toy: uvicorn.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._agent: Any = None

    async def start(self, server: uvicorn.Server) -> None:
        from relay.publisher import Agent, PublisherConfig
        from relay.toy_backend import create_toy_backend

        port = _free_port()
        self._toy = uvicorn.Server(
            uvicorn.Config(
                create_toy_backend(model="toy-model", record=False),
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="off",
            )
        )
        self._tasks.append(asyncio.create_task(self._toy.serve(), name="demo backend"))
        while not self._toy.started:
            await asyncio.sleep(0.01)
        # The demo publisher needs a token the relay accepts.
        token = secrets.token_urlsafe(24)
        self.auth.add("demo", token, frozenset({"publish"}))
        host = "127.0.0.1" if self.settings.host in {"0.0.0.0", "::", ""} else self.settings.host
        relay_port = (
            server.servers[0].sockets[0].getsockname()[1] if server.servers else self.settings.port
        )
        config = PublisherConfig.build(
            f"http://{host}:{relay_port}",
            token,
            [
                {
                    "name": DEMO_MODEL,
                    "url": f"http://127.0.0.1:{port}",
                    "model": "toy-model",
                    "description": "toy echo model started by relay serve --demo",
                }
            ],
        )
        self._agent = Agent(config)
        self._tasks.append(asyncio.create_task(self._agent.run(), name="demo publisher"))
        await asyncio.wait_for(self._agent.registered.wait(), 10)
        log.info(
            "demo: model %r published (toy backend on 127.0.0.1:%d); try:\n  curl -s "
            "http://%s:%d/v1/chat/completions -H 'content-type: application/json' "
            '-d \'{"model": "demo", "messages": [{"role": "user", "content": "hello"}]}\'',
            DEMO_MODEL,
            port,
            host,
            relay_port,
        )

    async def stop(self) -> None:
        if self._agent is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._agent.stop(), 5)
        if self._toy is not None:
            self._toy.should_exit = True
        for task in self._tasks:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 5)
