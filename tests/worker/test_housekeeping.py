"""The housekeeping sweep on fakeredis, with the clock in the test's hands."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from relay.housekeeping import SweepReport, sweep, sweep_tasks
from relay.store import Store
from tests.worker.conftest import Clock
from tests.worker.helpers import (
    inbox,
    keys,
    publisher,
    replica,
    route,
    snapshot,
    spec,
    status,
)

HOUR = 3600.0


async def keep_alive(
    store: Store, clock: Clock, seconds: float, replicas: list[str], sessions: list[str]
) -> None:
    """Let ``seconds`` pass while ``replicas`` and ``sessions`` stay alive,
    in steps short enough for every TTL (liveness 15 s, heartbeat 90 s)."""
    end = clock.now + seconds
    while clock.now < end:
        clock.advance(min(10.0, end - clock.now))
        for rid in replicas:
            await replica(store, rid, clock.now)
        for sid in sessions:
            await store.heartbeat(sid, "alice", clock.now)


async def messy(store: Store, clock: Clock) -> None:
    """Every kind of garbage at once; sweep it at ``clock.now`` afterwards.

    Replica A dies holding session s1 (rows llama, qwen; task t1 from a
    consumer on B). Replica C dies while its consumer waits on t3 (session
    s3 on B, which falls silent: row phi). Task t2's consumer waits on A.
    Session s2 on B stays alive (row mistral, task t4 from B). Row old has
    been inactive for 5 h. Row gpt is public.
    """
    t0 = clock.now
    await store.bind("s4", "alice", "B", "ch-s4", t0 - 5 * HOUR - 100)
    await store.register("s4", "alice", [spec("old")], t0 - 5 * HOUR - 100)
    await store.unbind("s4", "ch-s4", t0 - 5 * HOUR)
    for rid in ("A", "B", "C"):
        await replica(store, rid, t0)
    await publisher(store, "s1", "A", ["llama", "qwen"], t0)
    await publisher(store, "s2", "B", ["mistral"], t0)
    await publisher(store, "s3", "B", ["phi"], t0)
    await store.put_public({"name": "gpt", "url": "http://up", "model": "gpt-4o"}, t0)
    await route(store, "llama", "t1", "B", t0)
    await route(store, "mistral", "t2", "A", t0)
    await route(store, "phi", "t3", "C", t0)
    await route(store, "mistral", "t4", "B", t0)
    await keep_alive(store, clock, 100, ["B"], ["s2"])


MESSY_COUNTS = {
    "rows_deactivated": 3,  # llama, qwen (dead replica A), phi (silent s3)
    "tasks_failed": 1,  # t1: its consumer on B is told
    "rows_deleted": 1,  # old
    "replicas_removed": 2,  # A, C
    "streams_removed": 1,  # A's inbox (C never got a message)
    "tasks_removed": 2,  # t2 (consumer on A), t3 (consumer on C)
}


async def test_stale_rows_go_inactive_and_their_tasks_fail(store: Store, clock: Clock) -> None:
    t0 = clock.now
    for rid in ("A", "B"):
        await replica(store, rid, t0)
    await store.bind("s1", "alice", "A", "ch-s1", t0)
    await store.register(
        "s1", "alice", [spec("llama"), spec("sleepy", initialStatus="hibernating")], t0
    )
    await publisher(store, "s2", "A", ["fresh"], t0)
    await route(store, "llama", "t1", "B", t0 + 1)
    await keep_alive(store, clock, 89, ["A", "B"], ["s2"])

    early = await sweep(store, clock.now)  # 89 s of silence: not yet
    assert not early.changed
    await keep_alive(store, clock, 1, ["A", "B"], ["s2"])
    report = await sweep(store, clock.now)

    assert (report.rows_deactivated, report.tasks_failed) == (2, 1)
    for name in ("llama", "sleepy"):
        row = await store.get_row(name)
        assert row is not None
        assert row["status"] == "inactive" and float(row["inactiveSince"]) == clock.now
    assert await status(store, "fresh") == "active"
    assert await inbox(store, "B") == [
        {
            "k": "fail",
            "t": "t1",
            "c": "502",
            "d": "the publisher serving this model disconnected before answering",
        }
    ]
    assert not await store.redis.exists(store.keys.task("t1"), store.keys.session_tasks("s1"))


async def test_rows_inactive_past_retention_are_deleted_with_their_indexes(
    store: Store, clock: Clock
) -> None:
    t0 = clock.now
    await replica(store, "A", t0)
    await publisher(store, "s1", "A", ["llama", "qwen"], t0)
    await store.put_public({"name": "gpt", "url": "http://up", "model": "gpt-4o"}, t0)
    await store.unbind("s1", "ch-s1", t0 + 10)  # inactive since t0 + 10

    kept = await sweep(store, t0 + 10 + 4 * HOUR - 1)
    assert not kept.changed
    report = await sweep(store, t0 + 10 + 4 * HOUR)

    assert report.rows_deleted == 2
    assert await status(store, "llama") == await status(store, "qwen") == "gone"
    assert [r["name"] for r in await store.list_rows()] == ["gpt"]  # public rows stay
    assert await store.redis.smembers(store.keys.llms) == {b"gpt"}
    assert not await store.redis.exists(store.keys.session_llms("s1"))


async def test_dead_replica_inbox_goes_and_its_sessions_end(store: Store, clock: Clock) -> None:
    t0 = clock.now
    for rid in ("A", "B"):
        await replica(store, rid, t0)
    await publisher(store, "s1", "A", ["llama"], t0)  # held by A, which dies
    await publisher(store, "s2", "B", ["qwen"], t0)
    await route(store, "llama", "t1", "B", t0)  # XADDed to A's inbox
    assert await store.redis.exists(store.keys.inbox("A"))
    await keep_alive(store, clock, 20, ["B"], ["s1", "s2"])  # A's liveness expires

    report = await sweep(store, clock.now)

    assert report.counts() == {
        "rows_deactivated": 1,
        "tasks_failed": 1,
        "rows_deleted": 0,
        "replicas_removed": 1,
        "streams_removed": 1,
        "tasks_removed": 0,
    }
    assert not await store.redis.exists(store.keys.inbox("A"), store.keys.replica_sessions("A"))
    assert await store.redis.smembers(store.keys.replicas) == {b"B"}
    assert await status(store, "llama") == "inactive"  # fresh, but its replica is gone
    assert await status(store, "qwen") == "active"
    assert [m["k"] + ":" + m["t"] for m in await inbox(store, "B")] == ["fail:t1"]
    assert not (await sweep(store, clock.now)).changed
    # The publisher reconnects through B: the 'close' for its old channel
    # recreates A's inbox, which the next sweep removes again.
    await store.bind("s1", "alice", "B", "ch-new", clock.now)
    assert await store.redis.exists(store.keys.inbox("A"))
    again = await sweep(store, clock.now)
    assert (again.replicas_removed, again.streams_removed) == (1, 1)
    assert not await store.redis.exists(store.keys.inbox("A"))


async def test_orphaned_and_expired_tasks_are_removed(store: Store, clock: Clock) -> None:
    t0 = clock.now
    for rid in ("A", "B"):
        await replica(store, rid, t0)
    await publisher(store, "s1", "A", ["llama"], t0)
    await store.register("s1", "alice", [spec("sleepy", initialStatus="hibernating")], t0)
    await route(store, "llama", "old", "B", t0)
    await route(store, "sleepy", "wake", "B", t0, kind="wake")  # wake timeout: 600 s
    await route(store, "llama", "young", "B", t0 + 300)
    await route(store, "llama", "lost", "C", t0 + 300)  # C never lived
    await store.redis.delete(store.keys.inbox("A"))

    report = await sweep_tasks(store, t0 + 305)

    assert report.tasks_removed == 2
    left = await store.redis.smembers(store.keys.session_tasks("s1"))
    assert left == {b"wake", b"young"}
    # The publisher (via A) is told to abort both; the consumer still
    # waiting on B for "old" gets a timeout; nobody writes to C's inbox.
    assert sorted((m["k"], m["t"]) for m in await inbox(store, "A")) == [
        ("cancel", "lost"),
        ("cancel", "old"),
    ]
    assert [(m["k"], m["t"], m["c"]) for m in await inbox(store, "B")] == [("fail", "old", "504")]
    assert not await store.redis.exists(store.keys.inbox("C"))
    assert (await sweep_tasks(store, t0 + 604)).tasks_removed == 0
    # Young (infer, 300 s + 5 s grace) and wake (600 s + 5 s) both run out now.
    assert (await sweep_tasks(store, t0 + 605)).tasks_removed == 2
    assert not await store.redis.exists(store.keys.session_tasks("s1"))


async def test_a_second_sweep_changes_nothing(store: Store, clock: Clock) -> None:
    await messy(store, clock)
    first = await sweep(store, clock.now)
    assert first.counts() == MESSY_COUNTS
    before = await snapshot(store)

    second = await sweep(store, clock.now)

    assert not second.changed, second
    assert await snapshot(store) == before


@pytest.fixture
def interleaved(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """fakeredis answers without ever suspending, so gathered sweeps would
    just run one after the other. Yield to the loop a random number of times
    before every reply, so that concurrent sweeps interleave command by
    command (a seeded, reproducible interleaving)."""
    from fakeredis._clients._async import FakeBaseAsyncConnection

    original = FakeBaseAsyncConnection.read_response

    def install(seed: int) -> None:
        rng = random.Random(seed)

        async def read_response(self: Any, **kwargs: Any) -> Any:
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            return await original(self, **kwargs)

        monkeypatch.setattr(FakeBaseAsyncConnection, "read_response", read_response)

    return install


@pytest.mark.parametrize("seed", range(8))
async def test_concurrent_sweeps_change_everything_exactly_once(
    make_store: Callable[[], Store],
    clock: Clock,
    interleaved: Callable[[int], None],
    seed: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seeder = make_store()
    await messy(seeder, clock)
    workers = [make_store() for _ in range(3)]
    conflicts = 0
    original_execute = Pipeline.execute

    async def counting_execute(self: Pipeline, raise_on_error: bool = True) -> Any:
        nonlocal conflicts
        try:
            return await original_execute(self, raise_on_error)
        except WatchError:
            conflicts += 1
            raise

    monkeypatch.setattr(Pipeline, "execute", counting_execute)
    interleaved(seed)

    reports = await asyncio.gather(*(sweep(w, clock.now) for w in workers))

    total = sum(reports, SweepReport())
    assert total.counts() == MESSY_COUNTS, [r.counts() for r in reports]
    assert sum(r.changed for r in reports) > 1 or conflicts, "the sweeps did not overlap"
    assert [m["t"] for m in await inbox(seeder, "B") if m["k"] == "fail"] == ["t1"]
    assert not (await sweep(seeder, clock.now)).changed


async def test_nothing_is_left_once_every_process_stopped(store: Store, clock: Clock) -> None:
    await messy(store, clock)
    await store.delete_row("gpt")  # admin rows are not garbage: remove ours by hand
    await sweep(store, clock.now)
    # Every process stops without cleaning up; TTLs run out.
    clock.advance(HOUR)
    await sweep(store, clock.now)
    # While rows are retained for a sticky reconnect, only they and their
    # indexes remain: no session, task, replica or inbox key.
    assert {k.split(":")[1] for k in await keys(store)} == {"llm", "llms", "session"}
    assert all(k.endswith(":llms") for k in await keys(store) if ":session:" in k)

    clock.advance(4 * HOUR)
    await sweep(store, clock.now)

    assert await keys(store) == []


async def test_sweep_logs_one_line(
    store: Store, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    await messy(store, clock)
    with caplog.at_level(logging.INFO, logger="relay.housekeeping"):
        await sweep(store, clock.now)
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.housekeeping"]
    assert len(lines) == 1
    assert lines[0].startswith(
        "sweep: 3 rows inactive (1 task failed), 1 row deleted, 2 replicas removed "
        "(1 stream), 2 tasks removed in "
    )
    assert lines[0].endswith(" ms")
