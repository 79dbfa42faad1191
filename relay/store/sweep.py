"""Redis I/O of the housekeeping sweep (``relay.housekeeping``).

Every change here re-checks its condition under WATCH and reports what its
own transaction changed, so that two sweeps running at once (two workers)
do each change exactly once and their reports add up to one sweep's.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.exceptions import WatchError

from relay import lifecycle
from relay.store.common import WATCH_ATTEMPTS, Contended, OrphanedTask, _row, _s, atomically
from relay.store.store import Store

log = logging.getLogger("relay.store")


class SweepStore:
    """The sweep's queries and changes, over a ``Store``'s connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis = store.redis
        self.keys = store.keys
        self.lc = store.lc
        self.inbox_maxlen = store.inbox_maxlen

    @property
    def _index_ttl(self) -> int:
        return self.store.index_ttl

    async def list_rows(self) -> list[dict[str, str]]:
        return await self.store.list_rows()

    async def _session_fallout(self, pipe: Any, sid: str, now: float) -> list[OrphanedTask]:
        return await self.store.session_fallout(pipe, sid, now)

    async def delete_if_expired(self, name: str, now: float) -> bool:
        """Delete a row the sweep found past its retention, unless it changed since."""
        key = self.keys.llm(name)

        async def change(pipe: Any) -> bool:
            row = _row(await pipe.hgetall(key))
            if not row or lifecycle.plan_sweep(row, now, self.lc) != "delete":
                return False
            pipe.multi()
            pipe.delete(key)
            pipe.srem(self.keys.llms, name)
            if row.get("providerSessionId"):
                pipe.srem(self.keys.session_llms(row["providerSessionId"]), name)
            return True

        return await atomically(self.redis, [key], change)

    async def _scan(self, pattern: str) -> set[str]:
        """Our keys matching ``pattern`` (after the tag). SCAN, never KEYS:
        the Redis may be large, and shared with other prefixes."""
        tag = "".join("\\" + c if c in "*?[]\\" else c for c in self.keys.tag)
        found: set[str] = set()
        async for key in self.redis.scan_iter(match=f"{tag}:{pattern}", count=1000):
            found.add(_s(key))
        return found

    async def known_replicas(self) -> set[str]:
        """Every replica id something in Redis still refers to: the registry
        set, and inbox streams or session sets left behind (a replica that
        shut down cleanly may still get an XADD after it left the set)."""
        ids = {_s(r) for r in await self.redis.smembers(self.keys.replicas)}
        inbox_head = len(self.keys.inbox(""))
        ids.update(k[inbox_head:] for k in await self._scan("inbox:*"))
        head, tail = len(self.keys.replica("")), len(":sessions")
        ids.update(k[head:-tail] for k in await self._scan("replica:*:sessions"))
        ids.discard("")
        return ids

    async def dead_replicas(self) -> list[str]:
        """Known replicas whose liveness key is gone: crashed, or stopped
        without cleaning up after themselves."""
        ids = sorted(await self.known_replicas())
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in ids:
                pipe.exists(self.keys.replica(rid))
            alive = await pipe.execute()
        return [rid for rid, up in zip(ids, alive, strict=True) if not up]

    async def replica_session_ids(self, replica: str) -> list[str]:
        return sorted(_s(s) for s in await self.redis.smembers(self.keys.replica_sessions(replica)))

    async def _counted_fallout(
        self, pipe: Any, sid: str, now: float
    ) -> tuple[list[str], list[OrphanedTask]]:
        """``_session_fallout`` (the same writes as ``deactivate_session``),
        plus the names of the rows it flips, read under the same WATCH."""
        await pipe.watch(self.keys.session_llms(sid), self.keys.session_tasks(sid))
        names = sorted(_s(n) for n in await pipe.smembers(self.keys.session_llms(sid)))
        if names:
            await pipe.watch(*(self.keys.llm(n) for n in names))
        flipped = []
        for name in names:
            row = _row(await pipe.hgetall(self.keys.llm(name)))
            if row.get("providerSessionId") == sid and lifecycle.plan_deactivate(row, now):
                flipped.append(name)
        orphans = await self._session_fallout(pipe, sid, now)
        return flipped, orphans

    async def deactivate_stale(self, name: str, now: float) -> tuple[list[str], list[OrphanedTask]]:
        """Row ``name`` fell silent: unless a heartbeat (or another sweep)
        came first, its session ends as on a disconnect, so its rows go
        inactive and its in-flight tasks fail. Returns (rows flipped, tasks
        failed)."""
        key = self.keys.llm(name)

        async def change(pipe: Any) -> tuple[list[str], list[OrphanedTask]]:
            row = _row(await pipe.hgetall(key))
            if not row or lifecycle.plan_sweep(row, now, self.lc) != "deactivate":
                return [], []
            sid = row.get("providerSessionId", "")
            flipped: list[str] = []
            orphans: list[OrphanedTask] = []
            if sid:
                flipped, orphans = await self._counted_fallout(pipe, sid, now)
            else:
                pipe.multi()
            if name not in flipped:  # not in its session's set: flip it alone
                plan = lifecycle.plan_deactivate(row, now)
                if plan:
                    pipe.hset(key, mapping=plan)
                    pipe.expire(key, int(self.lc.inactive_retention))
                    pipe.expire(self.keys.llms, self._index_ttl)
                    flipped.append(name)
            return flipped, orphans

        return await atomically(self.redis, [key], change)

    async def release_dead_session(
        self, replica: str, sid: str, now: float
    ) -> tuple[list[str], list[OrphanedTask]]:
        """``replica`` is dead and held ``sid``: the session ends as on a
        disconnect (rows inactive, in-flight tasks failed towards the
        consumers' replicas). A session that moved to another replica is only
        unlinked. The binding itself is kept: a replica that was only paused
        past its liveness TTL still serves the session when it comes back
        (the next heartbeat revives the rows), and the 'close' a reconnect
        elsewhere sends to the dead inbox is swept with it next time.
        Returns (rows flipped, tasks failed)."""
        live, skey = self.keys.replica(replica), self.keys.session(sid)
        linked = self.keys.replica_sessions(replica)

        async def change(pipe: Any) -> tuple[list[str], list[OrphanedTask]]:
            if await pipe.exists(live):
                return [], []  # it came back: not ours to clean
            exists = bool(await pipe.exists(skey))
            bound = _s(await pipe.hget(skey, "replica"))
            flipped: list[str] = []
            orphans: list[OrphanedTask] = []
            if bound == replica or not exists:
                flipped, orphans = await self._counted_fallout(pipe, sid, now)
            else:
                pipe.multi()
            pipe.srem(linked, sid)
            return flipped, orphans

        return await atomically(self.redis, [live, skey, linked], change)

    async def remove_dead_replica(self, replica: str) -> tuple[bool, bool]:
        """Forget a dead replica once its sessions are released: delete its
        inbox stream and drop it from the registry. Returns (anything
        removed, stream deleted); (False, False) when it came back, still
        has sessions, or another sweep removed it first."""
        live, linked = self.keys.replica(replica), self.keys.replica_sessions(replica)
        inbox = self.keys.inbox(replica)
        async with self.redis.pipeline(transaction=True) as pipe:
            for _attempt in range(WATCH_ATTEMPTS):
                try:
                    await pipe.watch(live, linked, inbox)
                    if await pipe.exists(live) or await pipe.scard(linked):
                        await pipe.reset()
                        return False, False
                    pipe.multi()
                    pipe.delete(inbox)
                    pipe.srem(self.keys.replicas, replica)
                    deleted, dropped = await pipe.execute()
                    return bool(deleted or dropped), bool(deleted)
                except WatchError:
                    continue
            raise Contended()

    async def sweepable_tasks(self, now: float) -> list[str]:
        """Task ids that ``remove_task`` would remove now (a read-only first
        pass, so that only those pay for a transaction)."""
        head = len(self.keys.task(""))
        ids = sorted(k[head:] for k in await self._scan("task:*"))
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for tid in ids:
                pipe.hgetall(self.keys.task(tid))
            tasks = [_row(raw) for raw in await pipe.execute()]
        replicas = sorted({t.get("replica", "") for t in tasks} - {""})
        async with self.redis.pipeline(transaction=False) as pipe:
            for rid in replicas:
                pipe.exists(self.keys.replica(rid))
            alive = {rid for rid, up in zip(replicas, await pipe.execute(), strict=True) if up}
        return [
            tid
            for tid, task in zip(ids, tasks, strict=True)
            if task
            and lifecycle.plan_task_sweep(
                task, now, self.lc, consumer_alive=task.get("replica", "") in alive
            )
        ]

    async def remove_task(self, task_id: str, now: float) -> lifecycle.TaskSweepAction | None:
        """Remove a task nobody waits for any more (its consumer's replica is
        gone, or it outlived its timeout), unless that changed meanwhile. The
        publisher is told to abort it, and a consumer still waiting on a live
        replica gets a timeout failure. Dead replicas get no messages (that
        would recreate their inbox). Returns what was done, or None."""
        key = self.keys.task(task_id)

        async def change(pipe: Any) -> lifecycle.TaskSweepAction | None:
            task = _row(await pipe.hgetall(key))
            if not task:
                return None
            sid, consumer = task.get("session", ""), task.get("replica", "")
            holder = ""
            if sid:
                await pipe.watch(self.keys.session(sid))
                holder = _s(await pipe.hget(self.keys.session(sid), "replica"))
            alive: set[str] = set()
            for rid in {consumer, holder} - {""}:
                await pipe.watch(self.keys.replica(rid))
                if await pipe.exists(self.keys.replica(rid)):
                    alive.add(rid)
            action = lifecycle.plan_task_sweep(task, now, self.lc, consumer_alive=consumer in alive)
            if action is None:
                return None
            pipe.multi()
            pipe.delete(key)
            if sid:
                pipe.srem(self.keys.session_tasks(sid), task_id)
            if holder in alive:
                pipe.xadd(
                    self.keys.inbox(holder),
                    {"k": "cancel", "s": sid, "t": task_id},
                    maxlen=self.inbox_maxlen,
                    approximate=True,
                )
            if action == "expired" and consumer in alive:
                pipe.xadd(
                    self.keys.inbox(consumer),
                    {
                        "k": "fail",
                        "t": task_id,
                        "c": "504",
                        "d": "the publisher gave no answer within the task timeout",
                    },
                    maxlen=self.inbox_maxlen,
                    approximate=True,
                )
            return action

        return await atomically(self.redis, [key], change)
