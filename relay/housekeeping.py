"""Housekeeping: the sweep that keeps the shared Redis true and small.

Replicas hold no state of their own, so nobody notices on their own that a
publisher fell silent, that a replica crashed, or that a row has been
inactive for hours. One sweep, run every ``gc_interval_seconds`` by the arq
worker (``worker.jobs.gc_sweep``) or, in the embedded single-process mode,
by the relay itself, fixes all of it. It needs nothing but a ``Store``.

Decisions come from ``relay.lifecycle``; every change is a ``SweepStore`` method
that re-checks its condition under WATCH and reports what it changed. So a
sweep is idempotent (a second one in a row changes nothing), and two sweeps
running at once, on two worker replicas, change everything exactly once:
their reports add up to one sweep's.

Order matters. Tasks go first: a task whose consumer's replica is dead is
removed before any session fallout could send a failure to that replica's
inbox (which would recreate the stream). Dead replicas next: their sessions
end, then their inboxes go. Rows last: silent ones go inactive, and rows
inactive past the retention are deleted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields

from relay import lifecycle
from relay.store import Store
from relay.store.sweep import SweepStore

log = logging.getLogger("relay.housekeeping")


@dataclass
class SweepReport:
    """What one sweep (or one of its parts) changed; ``ms`` is wall time."""

    rows_deactivated: int = 0
    tasks_failed: int = 0
    rows_deleted: int = 0
    replicas_removed: int = 0
    streams_removed: int = 0
    tasks_removed: int = 0
    ms: float = 0.0

    def __add__(self, other: SweepReport) -> SweepReport:
        return SweepReport(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    def counts(self) -> dict[str, int]:
        """The counts alone (no timing): what tests and callers compare."""
        return {k: v for k, v in asdict(self).items() if k != "ms"}

    @property
    def changed(self) -> bool:
        return any(self.counts().values())

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}

    def summary(self) -> str:
        """The log line's text, e.g. ``2 rows inactive (1 task failed), 1 row
        deleted, 1 replica removed (1 stream), 3 tasks removed in 4.1 ms``."""
        return (
            f"{_n(self.rows_deactivated, 'row')} inactive "
            f"({_n(self.tasks_failed, 'task')} failed), "
            f"{_n(self.rows_deleted, 'row')} deleted, "
            f"{_n(self.replicas_removed, 'replica')} removed "
            f"({_n(self.streams_removed, 'stream')}), "
            f"{_n(self.tasks_removed, 'task')} removed in {self.ms:.1f} ms"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


async def sweep_tasks(store: Store, now: float) -> SweepReport:
    """Remove task records nobody waits for: the consumer's replica is gone,
    or the task outlived its timeout (normally the TTL does it)."""
    report = SweepReport()
    db = SweepStore(store)
    for task_id in await db.sweepable_tasks(now):
        if await db.remove_task(task_id, now):
            report.tasks_removed += 1
    return report


async def sweep_replicas(store: Store, now: float) -> SweepReport:
    """A replica whose liveness key expired is dead: the sessions it held
    end (rows inactive, in-flight tasks failed towards the consumers'
    replicas), then its inbox stream and registry entry go."""
    report = SweepReport()
    db = SweepStore(store)
    for replica in await db.dead_replicas():
        for sid in await db.replica_session_ids(replica):
            flipped, orphans = await db.release_dead_session(replica, sid, now)
            report.rows_deactivated += len(flipped)
            report.tasks_failed += len(orphans)
        removed, stream = await db.remove_dead_replica(replica)
        if removed:
            report.replicas_removed += 1
            report.streams_removed += int(stream)
            log.debug("replica %s is gone: removed (inbox stream: %s)", replica, stream)
    return report


async def sweep_rows(store: Store, now: float) -> SweepReport:
    """Silent virtual rows go inactive (their session's in-flight tasks
    fail); rows inactive past the retention are deleted with every index
    entry that names them."""
    report = SweepReport()
    db = SweepStore(store)
    for row in await store.list_rows():
        action = lifecycle.plan_sweep(row, now, store.lc)
        if action == "deactivate":
            flipped, orphans = await db.deactivate_stale(row["name"], now)
            report.rows_deactivated += len(flipped)
            report.tasks_failed += len(orphans)
        elif action == "delete" and await db.delete_if_expired(row["name"], now):
            report.rows_deleted += 1
    return report


async def sweep(store: Store, now: float) -> SweepReport:
    """One full, idempotent housekeeping pass at time ``now`` (epoch seconds,
    injected so tests control it); logs one INFO line with what it did."""
    started = time.perf_counter()
    report = await sweep_tasks(store, now)
    report += await sweep_replicas(store, now)
    report += await sweep_rows(store, now)
    report.ms = (time.perf_counter() - started) * 1000
    log.info("sweep: %s", report.summary())
    return report
