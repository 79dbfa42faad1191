"""Store semantics on fakeredis: each rule of the relay-core issue, one test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from relay.connections import Clients
from relay.keys import Keys
from relay.lifecycle import Conflict, Lifecycle
from relay.store import Forbidden, NotFound, Store

P1 = {"name": "llama", "type": "openai", "model": "llama3"}
P2 = {"name": "qwen", "type": "openai", "model": "qwen2"}


@pytest.fixture
async def store(fake_clients: Clients) -> AsyncIterator[Store]:
    yield Store(fake_clients.commands, Keys("t"), Lifecycle())


async def session(
    store: Store,
    sid: str,
    principal: str = "alice",
    replica: str = "A",
    channel: str = "c1",
    now: float = 100.0,
) -> None:
    await store.bind(sid, principal, replica, channel, now)
    await store.replica_alive(replica, 60, now)


async def inbox(store: Store, replica: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await store.redis.xrange(store.keys.inbox(replica))]


async def test_register_inserts_virtual_active_row(store: Store) -> None:
    await session(store, "s1")
    rows = await store.register("s1", "alice", [P1], 100.0)
    assert rows[0]["status"] == "active"
    stored = await store.get_row("llama")
    assert stored is not None
    assert stored["kind"] == "virtual" and stored["providerSessionId"] == "s1"
    assert stored["principal"] == "alice" and stored["createdAt"] == "100.000"
    assert [r["name"] for r in await store.list_rows()] == ["llama"]


async def test_sticky_reconnect_adopts_rows_after_disconnect(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    await store.unbind("s1", "c1", 110.0)
    assert (await store.get_row("llama") or {})["status"] == "inactive"
    await session(store, "s2", channel="c2", now=120.0)
    await store.register("s2", "alice", [P1], 120.0)
    row = await store.get_row("llama") or {}
    assert row["status"] == "active" and row["providerSessionId"] == "s2"
    assert row["createdAt"] == "100.000"


async def test_refuses_to_overwrite_public_row_and_changes_nothing(store: Store) -> None:
    await store.put_public({"name": "llama", "url": "http://up", "model": "gpt"}, 50.0)
    await session(store, "s1")
    with pytest.raises(Conflict, match="public"):
        await store.register("s1", "alice", [P2, P1], 100.0)
    assert (await store.get_row("llama") or {})["kind"] == "public"
    assert await store.get_row("qwen") is None  # all or nothing


async def test_refuses_another_sessions_live_row(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    await session(store, "s2", channel="c2")
    with pytest.raises(Conflict, match="another live session"):
        await store.register("s2", "alice", [P1], 101.0)
    assert (await store.get_row("llama") or {})["providerSessionId"] == "s1"


async def test_adopts_inactive_row_of_another_session_same_principal(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    await store.unbind("s1", "c1", 101.0)
    await session(store, "s2", channel="c2")
    await store.register("s2", "alice", [P1], 102.0)
    assert (await store.get_row("llama") or {})["providerSessionId"] == "s2"
    # The old session no longer owns it: its heartbeat does not touch it.
    await session(store, "s1", channel="c3")
    assert await store.heartbeat("s1", "alice", 103.0) == []


async def test_refuses_inactive_row_of_another_principal(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    await store.unbind("s1", "c1", 101.0)
    await session(store, "s2", principal="bob", channel="c2")
    with pytest.raises(Conflict, match="another principal"):
        await store.register("s2", "bob", [P1], 102.0)


async def test_session_of_another_principal_is_forbidden(store: Store) -> None:
    await session(store, "s1")
    with pytest.raises(Forbidden):
        await store.bind("s1", "bob", "B", "cx", 101.0)
    with pytest.raises(Forbidden):
        await store.register("s1", "bob", [P1], 101.0)
    with pytest.raises(Forbidden):
        await store.heartbeat("s1", "bob", 101.0)
    with pytest.raises(NotFound):
        await store.heartbeat("nope", "alice", 101.0)
    assert await store.get_row("llama") is None


async def test_heartbeat_bumps_and_revives_but_keeps_hibernating(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1, {**P2, "initialStatus": "hibernating"}], 100.0)
    await store.deactivate_session("s1", 150.0)
    names = await store.heartbeat("s1", "alice", 160.0)
    assert sorted(names) == ["llama", "qwen"]
    llama, qwen = await store.get_row("llama") or {}, await store.get_row("qwen") or {}
    assert llama["status"] == "active" and llama["lastHeartbeatAt"] == "160.000"
    assert llama["inactiveSince"] == ""
    assert qwen["status"] == "active"  # an inactive row revives to active, whatever it was before


async def test_heartbeat_keeps_hibernating_row_hibernating(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [{**P1, "initialStatus": "hibernating"}], 100.0)
    await store.heartbeat("s1", "alice", 130.0)
    row = await store.get_row("llama") or {}
    assert row["status"] == "hibernating" and row["lastHeartbeatAt"] == "130.000"


async def test_unbind_cascades_rows_inactive_and_fails_tasks_on_consumer_replica(
    store: Store,
) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    route = await store.route("llama", "t1", "B", 101.0, b"{}")
    assert route.outcome == "ok" and route.replica == "A"
    orphans = await store.unbind("s1", "c1", 102.0)
    assert [(o.task_id, o.replica) for o in orphans] == [("t1", "B")]
    row = await store.get_row("llama") or {}
    assert row["status"] == "inactive" and row["inactiveSince"] == "102.000"
    fails = [m for m in await inbox(store, "B") if m[b"k"] == b"fail"]
    assert fails and fails[0][b"t"] == b"t1" and fails[0][b"c"] == b"502"
    with pytest.raises(NotFound):  # the task is forgotten: a late result is refused
        await store.post("t1", "s1", "alice", "A", "result", b"{}", final=True)


async def test_takeover_closes_old_channel_without_deactivating(store: Store) -> None:
    await session(store, "s1", replica="A", channel="c1")
    await store.register("s1", "alice", [P1], 100.0)
    old = await store.bind("s1", "alice", "B", "c2", 101.0)
    assert old == ("A", "c1")
    closes = [m for m in await inbox(store, "A") if m[b"k"] == b"close"]
    assert closes and closes[0][b"c"] == b"c1"
    assert await store.unbind("s1", "c1", 102.0) == []  # the old channel's drop changes nothing
    assert (await store.get_row("llama") or {})["status"] == "active"


async def test_route_outcomes(store: Store) -> None:
    assert (await store.route("nope", "t0", "A", 1.0, b"{}")).outcome == "unknown"
    await session(store, "s1")
    await store.register("s1", "alice", [P1, {**P2, "initialStatus": "hibernating"}], 100.0)
    assert (await store.route("qwen", "t1", "A", 101.0, b"{}")).outcome == "hibernating"
    await store.put_public(
        {"name": "gpt", "url": "http://up/v1", "model": "gpt-4o", "apiKey": "k"}, 1.0
    )
    public = await store.route("gpt", "t2", "A", 101.0, b"{}")
    assert (public.outcome, public.url, public.api_key, public.model) == (
        "public",
        "http://up/v1",
        "k",
        "gpt-4o",
    )
    await store.redis.delete(store.keys.replica("A"))  # the holding replica died
    assert (await store.route("llama", "t3", "B", 101.0, b"{}")).outcome == "offline"
    await store.unbind("s1", "c1", 102.0)
    assert (await store.route("llama", "t4", "B", 103.0, b"{}")).outcome == "inactive"
    assert await store.redis.exists(store.keys.task("t4")) == 0  # nothing queued


async def test_route_pushes_to_holding_replica_inbox_only_when_remote(store: Store) -> None:
    await session(store, "s1", replica="A")
    await store.register("s1", "alice", [P1], 100.0)
    await store.route("llama", "local", "A", 101.0, b'{"x":1}')
    assert await inbox(store, "A") == []
    await store.route("llama", "remote", "B", 101.0, b'{"x":2}')
    tasks = await inbox(store, "A")
    assert [(m[b"t"], m[b"r"], m[b"d"]) for m in tasks] == [(b"remote", b"B", b'{"x":2}')]


async def test_post_checks_owner_and_forwards_to_consumer_replica(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    await store.route("llama", "t1", "B", 101.0, b"{}")
    with pytest.raises(Forbidden):
        await store.post("t1", "s2", "alice", "C", "chunks", b"{}", final=False)
    with pytest.raises(Forbidden):
        await store.post("t1", "s1", "mallory", "C", "chunks", b"{}", final=False)
    assert (
        await store.post("t1", "s1", "alice", "C", "chunks", b'{"chunks":["a"]}', final=False)
        == "B"
    )
    assert (
        await store.post("t1", "s1", "alice", "C", "result", b'{"status":200}', final=True) == "B"
    )
    kinds = [m[b"k"] for m in await inbox(store, "B")]
    assert kinds == [b"chunks", b"result"]
    with pytest.raises(NotFound):
        await store.post("t1", "s1", "alice", "C", "result", b"{}", final=True)


async def test_cancel_reaches_the_replica_holding_the_session(store: Store) -> None:
    await session(store, "s1", replica="A")
    await store.register("s1", "alice", [P1], 100.0)
    await store.route("llama", "t1", "B", 101.0, b"{}")
    assert await store.cancel("t1", "B") == ("remote", "s1")
    assert [m[b"k"] for m in await inbox(store, "A")][-1] == b"cancel"
    assert await store.cancel("t1", "B") == ("none", "")
    assert await store.redis.scard(store.keys.session_tasks("s1")) == 0


async def test_public_row_refused_while_virtual_row_holds_the_name(store: Store) -> None:
    await session(store, "s1")
    await store.register("s1", "alice", [P1], 100.0)
    with pytest.raises(Conflict):
        await store.put_public({"name": "llama", "url": "http://x", "model": "m"}, 1.0)
