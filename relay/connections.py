"""Redis clients for a replica (or the worker): plain URL, Sentinel, or the
embedded in-process store.

Two clients per process. ``commands`` serves requests: it waits for Redis
through a failover or restart (reconnecting, through the Sentinels when
configured) for up to ``RETRY_BUDGET_SECONDS``, then raises, so a request
gets a clean 503 instead of hanging. ``blocking`` carries the inbox's long
XREAD (its socket timeout exceeds the block time, and it must not hold a
connection the request path needs); it does not retry at all, so the inbox
sees a lost connection at once, reports itself unready and reconnects with
its own backoff, keeping its place in the stream.

Why a budget instead of redis-py's retry count: redis-py 5 retries a command
only once the pool has handed out a connected connection. A connection that
cannot be (re)established fails in the pool, before any retry, and the
connect retry nests inside the command retry with the same counter. So the
pool here waits itself, and every retry in one operation shares one
deadline (a context variable), which bounds the whole wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

log = logging.getLogger("relay.connections")

# How long one Redis operation may wait for Redis to come back. A Sentinel
# failover takes down-after-milliseconds plus about a second (2.3 s measured
# here with 1000 ms; the k8s manifests use 5000 ms): this covers it with room.
RETRY_BUDGET_SECONDS = 10.0

T = TypeVar("T")

_deadline: ContextVar[float | None] = ContextVar("relay_redis_deadline", default=None)
_RETRYABLE = (ConnectionError, TimeoutError)


@contextlib.contextmanager
def _budget(seconds: float) -> Iterator[float]:
    """The deadline of the outermost retrying step in this task: nested steps
    (connect inside command, pool inside pipeline) share it."""
    outer = _deadline.get()
    if outer is not None:
        yield outer
        return
    deadline = time.monotonic() + seconds
    token = _deadline.set(deadline)
    try:
        yield deadline
    finally:
        _deadline.reset(token)


def _pause(failures: int, deadline: float) -> float:
    """Capped exponential backoff, never past the deadline (<= 0: give up)."""
    remaining = deadline - time.monotonic()
    return min(0.025 * 2.0 ** min(failures, 10), 0.5, remaining)


class PatientRetry(Retry):  # type: ignore[misc]
    """redis-py's Retry, bounded by time instead of attempts (see module doc)."""

    __slots__ = ("_budget_seconds",)

    def __init__(self, budget: float = RETRY_BUDGET_SECONDS) -> None:
        super().__init__(ExponentialBackoff(cap=0.5, base=0.025), -1, _RETRYABLE)
        self._budget_seconds = budget

    async def call_with_retry(
        self, do: Callable[[], Awaitable[T]], fail: Callable[[Exception], Any]
    ) -> T:
        with _budget(self._budget_seconds) as deadline:
            failures = 0
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    failures += 1
                    await fail(error)
                    pause = _pause(failures, deadline)
                    if pause <= 0:
                        raise
                    await asyncio.sleep(pause)


async def _patiently(budget: float, get: Callable[[], Awaitable[T]]) -> T:
    """``get`` a connection, waiting out connection errors within the budget."""
    with _budget(budget) as deadline:
        failures = 0
        while True:
            try:
                return await get()
            except _RETRYABLE as exc:
                failures += 1
                pause = _pause(failures, deadline)
                if pause <= 0:
                    raise
                if failures == 1:
                    log.info("redis unavailable (%s); waiting up to %.1f s", exc, budget)
                await asyncio.sleep(pause)


class PatientPool(ConnectionPool):  # type: ignore[misc]
    """A pool whose ``get_connection`` waits for Redis within the budget."""

    retry_budget = RETRY_BUDGET_SECONDS

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        get = super().get_connection
        return await _patiently(self.retry_budget, lambda: get(*args, **kwargs))


class PatientSentinelPool(SentinelConnectionPool):  # type: ignore[misc]
    """The Sentinel pool, equally patient: each attempt asks the Sentinels
    for the master again, so a failover is followed without a restart."""

    retry_budget = RETRY_BUDGET_SECONDS

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        get = super().get_connection
        return await _patiently(self.retry_budget, lambda: get(*args, **kwargs))


@dataclass(slots=True)
class Clients:
    commands: Redis
    blocking: Redis
    embedded: bool = False

    async def aclose(self) -> None:
        await self.blocking.aclose()
        await self.commands.aclose()


def _patient_options(budget: float) -> dict[str, Any]:
    return {
        "retry": PatientRetry(budget),
        "retry_on_error": list(_RETRYABLE),
        "health_check_interval": 10,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
    }


def sentinel(sentinels: str) -> Sentinel:
    """A Sentinel manager for ``host:port,...``."""
    hosts = [_host_port(h) for h in sentinels.split(",") if h.strip()]
    if not hosts:
        raise ValueError("no sentinel address given")
    return Sentinel(hosts, socket_timeout=1.0, socket_connect_timeout=1.0)


def patient_master(
    sentinels: str,
    master_name: str,
    *,
    redis_class: type[Redis] = Redis,
    budget: float = RETRY_BUDGET_SECONDS,
) -> Redis:
    """A client of the Sentinel master that follows failovers (also used for
    the worker's arq pool, with ``redis_class=ArqRedis``)."""
    client = sentinel(sentinels).master_for(
        master_name,
        redis_class=redis_class,
        connection_pool_class=PatientSentinelPool,
        **_patient_options(budget),
    )
    client.connection_pool.retry_budget = budget
    return client


def patient_url(
    redis_url: str, *, redis_class: type[Redis] = Redis, budget: float = RETRY_BUDGET_SECONDS
) -> Redis:
    """A client of ``redis_url`` that waits out a restart within the budget."""
    pool = PatientPool.from_url(redis_url, **_patient_options(budget))
    pool.retry_budget = budget
    return redis_class.from_pool(pool)


def connect(
    redis_url: str | None,
    sentinels: str | None = None,
    master_name: str | None = None,
    *,
    block_seconds: float = 5.0,
    retry_budget: float = RETRY_BUDGET_SECONDS,
) -> Clients:
    blocking_options: dict[str, Any] = {
        "socket_timeout": block_seconds + 5.0,
        "socket_connect_timeout": 2.0,
        "health_check_interval": 10,
    }
    if sentinels:
        assert master_name
        commands = patient_master(sentinels, master_name, budget=retry_budget)
        blocking = sentinel(sentinels).master_for(master_name, **blocking_options)
        log.info("redis: master %r through sentinels %s", master_name, sentinels)
        return Clients(commands, blocking)
    if redis_url:
        commands = patient_url(redis_url, budget=retry_budget)
        blocking = Redis.from_url(redis_url, **blocking_options)
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
