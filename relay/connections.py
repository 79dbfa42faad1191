"""Redis clients for a replica (or the worker): plain URL, Sentinel, or the
embedded in-process store.

Two clients per process: one for commands, one for blocking inbox reads
(its socket timeout must exceed the block time, and a long XREAD must not
hold a connection the request path needs). Both retry connection errors
with exponential backoff, so a Redis failover is a pause, not an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

log = logging.getLogger("relay.connections")

# Long enough to ride out a Sentinel failover (about 2-3 s measured here).
_RETRIES = 8


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), _RETRIES)


@dataclass(slots=True)
class Clients:
    commands: Redis
    blocking: Redis
    embedded: bool = False

    async def aclose(self) -> None:
        await self.blocking.aclose()
        await self.commands.aclose()


def connect(
    redis_url: str | None,
    sentinels: str | None = None,
    master_name: str | None = None,
    *,
    block_seconds: float = 5.0,
) -> Clients:
    common: dict[str, object] = {
        "retry": _retry(),
        "retry_on_error": [ConnectionError, TimeoutError],
        "health_check_interval": 10,
        "socket_connect_timeout": 2.0,
    }
    if sentinels:
        from redis.asyncio.sentinel import Sentinel

        hosts = [_host_port(h) for h in sentinels.split(",") if h.strip()]
        sentinel = Sentinel(hosts, socket_timeout=1.0, socket_connect_timeout=1.0)
        assert master_name
        commands = sentinel.master_for(master_name, socket_timeout=5.0, **common)
        blocking = sentinel.master_for(
            master_name,
            socket_timeout=block_seconds + 5.0,
            **common,
        )
        return Clients(commands, blocking)
    if redis_url:
        commands = Redis.from_url(redis_url, socket_timeout=5.0, **common)
        blocking = Redis.from_url(
            redis_url,
            socket_timeout=block_seconds + 5.0,
            **common,
        )
        return Clients(commands, blocking)
    return embedded()


def embedded() -> Clients:
    """An in-process Redis (fakeredis, with Lua): single replica, no durability."""
    import fakeredis

    server = fakeredis.FakeServer()
    commands = fakeredis.FakeAsyncRedis(server=server)
    blocking = fakeredis.FakeAsyncRedis(server=server)
    return Clients(commands, blocking, embedded=True)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"sentinel address {text!r} is not host:port")
    return host, int(port)
