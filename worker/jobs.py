"""The arq jobs: thin wrappers that give ``relay.housekeeping`` a Store.

The sweep logic lives in ``relay.housekeeping`` so that the relay's
embedded mode runs exactly the same code without arq.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from relay.config import Settings, load_settings
from relay.connections import Clients, connect
from relay.housekeeping import sweep
from relay.keys import Keys
from relay.store import Store

Clock = Callable[[], float]

# What arq itself defaults to, for ``arq worker.settings.WorkerSettings`` with
# no RELAY_REDIS_* set; ``relay worker`` insists on an explicit Redis.
DEFAULT_REDIS_URL = "redis://localhost:6379/0"


def redis_url(settings: Settings) -> str | None:
    """The Redis URL the worker uses: None with Sentinel, else the configured
    one or arq's default (never the embedded store: that is per process)."""
    if settings.redis_sentinels:
        return None
    return settings.redis_url or DEFAULT_REDIS_URL


async def startup(ctx: dict[str, Any]) -> None:
    """Build the Store once per worker process. Its client is the relay's own
    (``relay.connections``): retries on connection errors, Sentinel aware."""
    settings: Settings = ctx.get("settings") or load_settings()
    _ensure_logging(settings.log_level)
    clients: Clients = connect(
        redis_url(settings),
        settings.redis_sentinels,
        settings.redis_master_name,
    )
    ctx["clients"] = clients
    ctx["store"] = Store(
        clients.commands,
        Keys(settings.redis_prefix),
        settings.lifecycle,
        inbox_maxlen=settings.inbox_maxlen,
    )


def _ensure_logging(level: str) -> None:
    """Under ``arq worker.settings.WorkerSettings`` only arq's own loggers have
    a handler; give ours one, or the sweep's line goes nowhere. (``relay
    worker`` configures the root logger itself.)"""
    ours = logging.getLogger("relay")
    if logging.getLogger().handlers or ours.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    ours.addHandler(handler)
    ours.setLevel(level)


async def shutdown(ctx: dict[str, Any]) -> None:
    clients: Clients | None = ctx.pop("clients", None)
    if clients is not None:
        await clients.aclose()


async def gc_sweep(ctx: dict[str, Any]) -> dict[str, float]:
    """Cron job: one housekeeping sweep. ``ctx["clock"]`` overrides the clock
    (tests); the returned counts are kept as the job result, which is also
    what makes the tick unique across worker replicas (see settings)."""
    store: Store = ctx["store"]
    clock: Clock = ctx.get("clock", time.time)
    report = await sweep(store, clock())
    return report.as_dict()
