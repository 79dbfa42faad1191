"""Seeding and inspection helpers for the housekeeping tests."""

from __future__ import annotations

from typing import Any

from relay.store import Store
from relay.wire import ProviderSpec

LIVENESS_TTL = 15.0


def spec(name: str, **extra: Any) -> ProviderSpec:
    return {"name": name, "type": "openai", "model": f"{name}-model", **extra}  # type: ignore[typeddict-item]


async def replica(store: Store, rid: str, now: float) -> None:
    """Replica ``rid`` is alive at ``now`` (for the next 15 s)."""
    await store.replica_alive(rid, LIVENESS_TTL, now)


async def publisher(
    store: Store, sid: str, rid: str, names: list[str], now: float, principal: str = "alice"
) -> None:
    """Session ``sid`` held by replica ``rid`` publishes ``names``."""
    await store.bind(sid, principal, rid, f"ch-{sid}", now)
    await store.register(sid, principal, [spec(n) for n in names], now)


async def route(
    store: Store, name: str, task_id: str, consumer: str, now: float, kind: str = "infer"
) -> None:
    ttl = store.lc.wake_timeout if kind == "wake" else None
    res = await store.route(name, task_id, consumer, now, b"{}", kind=kind, ttl=ttl)
    assert res.outcome == "ok", res


async def inbox(store: Store, rid: str) -> list[dict[str, str]]:
    entries = await store.redis.xrange(store.keys.inbox(rid))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


async def status(store: Store, name: str) -> str:
    row = await store.get_row(name)
    return row["status"] if row else "gone"


async def keys(store: Store) -> list[str]:
    return sorted(k.decode() for k in await store.redis.keys("*"))


async def snapshot(store: Store) -> dict[str, Any]:
    """Every key with its type, TTL and content; stream entry ids (times)
    are left out so that runs at different instants compare equal."""
    r = store.redis
    out: dict[str, Any] = {}
    for raw in sorted(await r.keys("*")):
        key = raw.decode()
        kind = (await r.type(raw)).decode()
        if kind == "hash":
            value: Any = await r.hgetall(raw)
        elif kind == "set":
            value = sorted(await r.smembers(raw))
        elif kind == "string":
            value = await r.get(raw)
        elif kind == "stream":
            value = [fields for _, fields in await r.xrange(raw)]
        else:
            value = kind
        out[key] = (kind, await r.ttl(raw), value)
    return out
