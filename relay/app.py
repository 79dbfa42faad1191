"""The ASGI application of one relay replica."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from relay.api import admin, errors, health, openai, providers
from relay.api.fastpath import RelayApp
from relay.auth import Authenticator, load_authenticator
from relay.config import Settings
from relay.connections import Clients, connect
from relay.service import Clock, Relay
from relay.upstream import Upstream

log = logging.getLogger("relay.app")


def create_app(
    settings: Settings,
    *,
    clients: Clients | None = None,
    auth: Authenticator | None = None,
    clock: Clock = time.time,
) -> FastAPI:
    """Build a replica. ``clients`` and ``clock`` are injectable for tests;
    by default the Redis clients come from the settings (embedded when no
    Redis is configured)."""
    authenticator = auth or load_authenticator(
        settings.tokens_file, settings.tokens, settings.no_auth
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_clients = clients or connect(
            settings.redis_url, settings.redis_sentinels, settings.redis_master_name
        )
        if own_clients.embedded:
            log.warning(
                "no Redis configured: running single-replica on an embedded in-process store "
                "(state is lost on exit; set RELAY_REDIS_URL to run several replicas)"
            )
        if authenticator.disabled:
            log.warning(
                "AUTHENTICATION IS OFF (--no-auth): anyone who can reach this port may "
                "publish and query models. Use only for local play."
            )
        relay = Relay(settings, own_clients, clock=clock)
        app.state.relay = relay
        app.state.upstream = Upstream(settings.task_timeout_seconds)
        await relay.start()
        extras: list[asyncio.Task[Any]] = []
        if own_clients.embedded:
            extras.append(asyncio.create_task(_housekeeping(relay), name="housekeeping"))
        try:
            yield
        finally:
            for task in extras:
                task.cancel()
            await relay.stop()
            await app.state.upstream.aclose()
            if clients is None:
                await own_clients.aclose()

    app = RelayApp(
        title="LLM relay",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.auth = authenticator
    app.state.max_body_bytes = settings.max_body_bytes
    errors.install(app)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(providers.router)
    app.include_router(admin.router)
    return app


async def _housekeeping(relay: Relay) -> None:
    """Embedded mode has no worker process: run its sweep here on a timer."""
    try:
        from relay.housekeeping import sweep
    except ImportError:  # pragma: no cover - housekeeping not built yet
        return
    while True:
        await asyncio.sleep(relay.settings.gc_interval_seconds)
        try:
            await sweep(relay.store, relay.clock())
        except Exception:
            log.exception("housekeeping sweep failed")
