"""Shapes and errors shared by the store's modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError, WatchError

from relay.lifecycle import Row

# A WATCH/MULTI change retried this many times gives up (503 to a caller):
# the keys kept changing under it, or the connection kept dropping.
WATCH_ATTEMPTS = 50


T = TypeVar("T")


async def atomically(redis: Any, keys: Sequence[str], change: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``change`` under WATCH ``keys`` (optimistic locking). It reads in
    immediate mode, may WATCH more keys, then either calls ``pipe.multi()``
    and queues its writes, which are executed here, or returns without
    (nothing is written). When a watched key changed before EXEC, it runs
    again; after WATCH_ATTEMPTS it gives up with Contended (a 503)."""
    async with redis.pipeline(transaction=True) as pipe:
        for _attempt in range(WATCH_ATTEMPTS):
            try:
                if keys:
                    await pipe.watch(*keys)
                result = await change(pipe)
                if pipe.explicit_transaction:
                    await pipe.execute()
                else:
                    await pipe.reset()
                return result
            except WatchError:
                continue
    raise Contended()


class Contended(RedisError):  # type: ignore[misc]  # redis is untyped here
    """A change under WATCH could not complete; retry later."""

    def __init__(self) -> None:
        super().__init__(
            f"a Redis change failed {WATCH_ATTEMPTS} times in a row (contention or a lost connection)"
        )


class NotFound(Exception):
    """The session, task or row does not exist (or no longer)."""


class Forbidden(Exception):
    """The caller is not the principal (or session) that owns the object."""


@dataclass(frozen=True, slots=True)
class Route:
    """Where a consumer request goes. ``outcome`` is one of: ok (pushed to
    ``replica`` for ``session_id``), unknown, inactive, hibernating, offline,
    public (proxy to ``url``), awake (a wake task for a row already active)."""

    outcome: str
    replica: str = ""
    session_id: str = ""
    principal: str = ""
    url: str = ""
    api_key: str = ""
    model: str = ""
    wake_seconds: str = ""  # hibernating: the publisher's wake bound, if it gave one


@dataclass(frozen=True, slots=True)
class OrphanedTask:
    """An in-flight task failed because its session went away."""

    task_id: str
    replica: str  # where its consumer waits


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _row(raw: dict[Any, Any]) -> Row:
    return {_s(k): _s(v) for k, v in raw.items()}


def public_view(row: Row) -> dict[str, Any]:
    """A row as GET endpoints show it: never the upstream key or the owner's
    internals."""
    return {k: v for k, v in row.items() if k != "apiKey"}
