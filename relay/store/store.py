"""Redis I/O of one replica: rows, sessions, tasks.

The hot path (route a task, post its chunks, post its result, cancel it) is
one Lua script each (``relay.store.scripts``): one round trip, atomic, sent
on the fast lane (``relay.store.fastlane``) when it is up. Lifecycle changes
(register, heartbeat, unbind) read the rows, let ``relay.lifecycle`` decide,
and write under WATCH/MULTI, retrying when a concurrent writer got there
first. Keys come from ``relay.keys``; all of them share one hash slot.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis

from relay import lifecycle
from relay.keys import Keys
from relay.lifecycle import Conflict, Lifecycle, Row
from relay.store import scripts
from relay.store.common import (
    Forbidden,
    NotFound,
    OrphanedTask,
    Route,
    _row,
    _s,
    atomically,
)
from relay.store.fastlane import FastLane, LaneDown
from relay.wire import PUBLIC, VIRTUAL, ProviderSpec

log = logging.getLogger("relay.store")


class Store:
    def __init__(
        self, redis: Redis, keys: Keys, lc: Lifecycle, *, inbox_maxlen: int = 100_000
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lc = lc
        self.inbox_maxlen = inbox_maxlen
        self._route = redis.register_script(scripts.ROUTE)
        self._post = redis.register_script(scripts.POST)
        self._cancel = redis.register_script(scripts.CANCEL)
        self.lane = FastLane(redis)

    async def aclose(self) -> None:
        """Close the hot path's own connection (the clients are the caller's)."""
        await self.lane.aclose()

    async def _hot(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """Run a hot-path script on the fast lane, or through redis-py when
        the lane is not (or no longer) up."""
        try:
            return await self.lane.evalsha(script.sha, script.script, keys, args)
        except LaneDown:
            return await script(keys=keys, args=args)

    @property
    def index_ttl(self) -> int:
        return int(self.lc.heartbeat_timeout + self.lc.inactive_retention)

    # --- hot path ---------------------------------------------------------
    async def route(
        self,
        name: str,
        task_id: str,
        replica: str,
        now: float,
        payload: bytes,
        kind: str = "infer",
        ttl: float | None = None,
    ) -> Route:
        ttl_ms = int((ttl or self.lc.task_timeout) * 1000) + 5000
        res = await self._hot(
            self._route,
            [self.keys.llm(name)],
            [
                self.keys.tag,
                task_id,
                replica,
                f"{now:.3f}",
                ttl_ms,
                payload,
                self.inbox_maxlen,
                name,
                kind,
            ],
        )
        out = [_s(x) for x in res]
        match out[0]:
            case "ok":
                return Route("ok", replica=out[1], session_id=out[2], principal=out[3])
            case "public":
                return Route("public", url=out[1], api_key=out[2], model=out[3])
            case "hibernating":
                return Route("hibernating", session_id=out[1], wake_seconds=out[2])
            case "offline":
                return Route("offline", session_id=out[1])
            case other:
                return Route(other)

    async def post(
        self,
        task_id: str,
        session_id: str,
        principal: str,
        replica: str,
        kind: str,
        payload: bytes,
        *,
        final: bool,
        via_inbox: bool = False,
    ) -> str:
        """Check that ``session_id`` of ``principal`` owns the task and forward
        ``payload``; return the replica where the consumer waits. Forwarding
        skips the inbox when that replica is ``replica`` (the caller delivers),
        unless ``via_inbox``."""
        res = await self._hot(
            self._post,
            [self.keys.task(task_id)],
            [
                self.keys.tag,
                task_id,
                session_id,
                principal,
                replica,
                kind,
                payload,
                self.inbox_maxlen,
                "1" if final else "0",
                "1" if via_inbox else "0",
            ],
        )
        outcome = _s(res[0])
        if outcome == "unknown":
            raise NotFound(f"task {task_id} is unknown or already finished")
        if outcome == "forbidden":
            raise Forbidden(f"task {task_id} belongs to another session")
        return _s(res[1])

    async def cancel(self, task_id: str, replica: str) -> tuple[str, str]:
        """Forget a task whose consumer is gone. Returns (where, sessionId):
        where is 'local' when the session is held by ``replica``, 'remote'
        when the cancel went to another replica's inbox, 'none' otherwise."""
        res = await self._hot(
            self._cancel,
            [self.keys.task(task_id)],
            [self.keys.tag, task_id, replica, self.inbox_maxlen],
        )
        out = [_s(x) for x in res]
        return out[0], (out[1] if len(out) > 1 else "")

    async def fail_task(self, task_id: str, status: int, message: str, replica: str) -> str:
        """Forget a task that cannot be served and tell its consumer's replica
        (through its inbox unless it is ``replica``). Returns that replica, or
        '' when the task was already gone."""
        key = self.keys.task(task_id)

        async def change(pipe: Any) -> str:
            sid, where = (_s(x) for x in await pipe.hmget(key, "session", "replica"))
            if not where:
                return ""
            pipe.multi()
            pipe.delete(key)
            pipe.srem(self.keys.session_tasks(sid), task_id)
            if where != replica:
                pipe.xadd(
                    self.keys.inbox(where),
                    {"k": "fail", "t": task_id, "c": str(status), "d": message},
                    maxlen=self.inbox_maxlen,
                    approximate=True,
                )
            return where

        return await atomically(self.redis, [key], change)

    # --- sessions -----------------------------------------------------------
    async def session_principal(self, sid: str) -> str | None:
        value = await self.redis.hget(self.keys.session(sid), "principal")
        return _s(value) if value is not None else None

    async def bind(
        self, sid: str, principal: str, replica: str, channel: str, now: float
    ) -> tuple[str, str]:
        """Record that ``replica`` holds ``sid`` on ``channel``.

        A session id nobody holds (new, or expired after a long outage) is
        created for ``principal``. A session of another principal is refused.
        Returns the previous (replica, channel) binding, if any, so that the
        caller can close the old channel (a takeover)."""
        skey = self.keys.session(sid)

        async def change(pipe: Any) -> tuple[str, str]:
            old = await pipe.hmget(skey, "principal", "replica", "channel")
            owner, old_replica, old_channel = (_s(x) for x in old)
            if owner and owner != principal:
                raise Forbidden(f"session {sid} belongs to another principal")
            pipe.multi()
            fields = {"principal": principal, "replica": replica, "channel": channel}
            if not owner:
                fields["createdAt"] = f"{now:.3f}"
            pipe.hset(skey, mapping=fields)
            pipe.expire(skey, int(self.lc.heartbeat_timeout))
            pipe.sadd(self.keys.replica_sessions(replica), sid)
            if old_replica and old_replica != replica:
                pipe.srem(self.keys.replica_sessions(old_replica), sid)
            if old_replica and old_channel and old_replica != replica:
                pipe.xadd(
                    self.keys.inbox(old_replica),
                    {"k": "close", "s": sid, "c": old_channel},
                    maxlen=self.inbox_maxlen,
                    approximate=True,
                )
            return old_replica, old_channel

        return await atomically(self.redis, [skey], change)

    async def _check_session(self, sid: str, principal: str) -> None:
        owner = await self.session_principal(sid)
        if owner is None:
            raise NotFound(f"session {sid} is unknown or expired; open a new session")
        if owner != principal:
            raise Forbidden(f"session {sid} belongs to another principal")

    async def register(
        self, sid: str, principal: str, providers: list[ProviderSpec], now: float
    ) -> list[Row]:
        """Upsert every provider's row for ``sid``, all or nothing."""
        await self._check_session(sid, principal)
        names = [p["name"] for p in providers]
        row_keys = [self.keys.llm(n) for n in names]

        async def change(pipe: Any) -> list[Row]:
            current = [_row(await pipe.hgetall(k)) or None for k in row_keys]
            plans = [
                lifecycle.plan_register(row, spec, sid, principal, now)
                for row, spec in zip(current, providers, strict=True)
            ]
            pipe.multi()
            for key, row, plan in zip(row_keys, current, plans, strict=True):
                pipe.hset(key, mapping=plan)
                pipe.expire(key, int(lifecycle.row_ttl(plan, self.lc)))
                old_sid = row.get("providerSessionId") if row else None
                if old_sid and old_sid != sid:
                    pipe.srem(self.keys.session_llms(old_sid), plan["name"])
            pipe.sadd(self.keys.llms, *names)
            pipe.expire(self.keys.llms, self.index_ttl)
            pipe.sadd(self.keys.session_llms(sid), *names)
            pipe.expire(
                self.keys.session_llms(sid),
                int(self.lc.heartbeat_timeout + self.lc.inactive_retention),
            )
            return [{**(row or {}), **plan} for row, plan in zip(current, plans, strict=True)]

        return await atomically(self.redis, [*row_keys], change)

    async def heartbeat(self, sid: str, principal: str, now: float) -> list[str]:
        """Bump every row ``sid`` owns and revive its inactive ones."""
        await self._check_session(sid, principal)
        names = sorted(_s(n) for n in await self.redis.smembers(self.keys.session_llms(sid)))
        row_keys = [self.keys.llm(n) for n in names]

        async def change(pipe: Any) -> list[str]:
            rows = [_row(await pipe.hgetall(k)) for k in row_keys]
            pipe.multi()
            owned = []
            for key, row in zip(row_keys, rows, strict=True):
                if row.get("providerSessionId") != sid:
                    continue
                plan = lifecycle.plan_heartbeat(row, now)
                pipe.hset(key, mapping=plan)
                pipe.expire(key, int(lifecycle.row_ttl({**row, **plan}, self.lc)))
                owned.append(row["name"])
            pipe.expire(self.keys.session(sid), int(self.lc.heartbeat_timeout))
            pipe.expire(self.keys.llms, self.index_ttl)
            return owned

        return await atomically(self.redis, row_keys, change)

    async def unbind(self, sid: str, channel: str, now: float) -> list[OrphanedTask]:
        """The SSE channel ``channel`` of ``sid`` dropped: unless the session was
        taken over meanwhile, its rows go inactive and its in-flight tasks fail.
        Failures for consumers on other replicas go out through their inboxes;
        the ones returned are all orphaned tasks (the caller fails local ones)."""
        skey = self.keys.session(sid)

        async def change(pipe: Any) -> list[OrphanedTask]:
            if _s(await pipe.hget(skey, "channel")) != channel:
                return []  # taken over by a newer channel: leave it be
            replica = _s(await pipe.hget(skey, "replica"))
            orphans = await self.session_fallout(pipe, sid, now)
            pipe.hset(skey, mapping={"replica": "", "channel": ""})
            if replica:
                pipe.srem(self.keys.replica_sessions(replica), sid)
            return orphans

        return await atomically(self.redis, [skey, self.keys.session_tasks(sid)], change)

    async def deactivate_session(self, sid: str, now: float) -> list[OrphanedTask]:
        """The session fell silent or its replica died (housekeeping): rows go
        inactive and in-flight tasks fail, as on a disconnect."""

        async def change(pipe: Any) -> list[OrphanedTask]:
            orphans = await self.session_fallout(pipe, sid, now)
            return orphans

        return await atomically(
            self.redis, [self.keys.session(sid), self.keys.session_tasks(sid)], change
        )

    async def session_fallout(self, pipe: Any, sid: str, now: float) -> list[OrphanedTask]:
        """Read (under WATCH) what a session's end touches, then queue, after
        MULTI, the writes: rows inactive, tasks failed and forgotten."""
        names = sorted(_s(n) for n in await pipe.smembers(self.keys.session_llms(sid)))
        task_ids = sorted(_s(t) for t in await pipe.smembers(self.keys.session_tasks(sid)))
        if names:
            await pipe.watch(*(self.keys.llm(n) for n in names))
        rows = [_row(await pipe.hgetall(self.keys.llm(n))) for n in names]
        orphans = []
        for tid in task_ids:
            where = _s(await pipe.hget(self.keys.task(tid), "replica"))
            if where:
                orphans.append(OrphanedTask(tid, where))
        pipe.multi()
        for name, row in zip(names, rows, strict=True):
            if row.get("providerSessionId") != sid:
                continue
            plan = lifecycle.plan_deactivate(row, now)
            if plan:
                pipe.hset(self.keys.llm(name), mapping=plan)
                pipe.expire(self.keys.llm(name), int(self.lc.inactive_retention))
                pipe.expire(self.keys.llms, self.index_ttl)  # the index outlives its rows
        for orphan in orphans:
            pipe.delete(self.keys.task(orphan.task_id))
            pipe.xadd(
                self.keys.inbox(orphan.replica),
                {
                    "k": "fail",
                    "t": orphan.task_id,
                    "c": "502",
                    "d": "the publisher serving this model disconnected before answering",
                },
                maxlen=self.inbox_maxlen,
                approximate=True,
            )
        pipe.delete(self.keys.session_tasks(sid))
        return orphans

    async def stranded_tasks(
        self, sid: str, replica: str, limit: int = 10_000
    ) -> list[tuple[str, bytes]]:
        """Tasks for ``sid`` left in the inbox of ``replica`` if it is dead,
        still unanswered (their records exist): what it may never have pushed
        down the session's channel. (id, payload) in routing order; empty
        while ``replica`` lives, since it forwards such tasks itself."""
        if await self.redis.exists(self.keys.replica(replica)):
            return []
        entries = await self.redis.xrange(self.keys.inbox(replica), count=limit)
        found = [
            (_s(fields[b"t"]), fields[b"d"])
            for _, fields in entries
            if fields.get(b"k") == b"task" and _s(fields.get(b"s")) == sid
        ]
        if not found:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for task_id, _ in found:
                pipe.hget(self.keys.task(task_id), "session")
            owners = await pipe.execute()
        return [item for item, owner in zip(found, owners, strict=True) if _s(owner) == sid]

    # --- rows -----------------------------------------------------------------
    async def get_row(self, name: str) -> Row | None:
        raw = await self.redis.hgetall(self.keys.llm(name))
        return _row(raw) if raw else None

    async def list_rows(self) -> list[Row]:
        names = sorted(_s(n) for n in await self.redis.smembers(self.keys.llms))
        if not names:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hgetall(self.keys.llm(n))
            raws = await pipe.execute()
        rows = [_row(r) for r in raws if r]
        gone = [n for n, r in zip(names, raws, strict=True) if not r]
        if gone:  # expired rows: drop their names from the index
            await self.redis.srem(self.keys.llms, *gone)
        return rows

    async def put_public(self, fields: dict[str, str], now: float) -> Row:
        """Create or replace a public row; refused while a virtual row holds the name."""
        key = self.keys.llm(fields["name"])

        async def change(pipe: Any) -> Row:
            row = _row(await pipe.hgetall(key))
            if row and row.get("kind") == VIRTUAL:
                raise Conflict(
                    f"Llm {fields['name']!r} is published by a publisher "
                    f"({row.get('principal')}); delete it first or pick another name"
                )
            ts = f"{now:.3f}"
            new: Row = {
                "kind": PUBLIC,
                "type": "openai",
                "description": "",
                "apiKey": "",
                "status": "active",
                "providerSessionId": "",
                "lastHeartbeatAt": "",
                "inactiveSince": "",
                "principal": "",
                **fields,
                "createdAt": row.get("createdAt", ts) if row else ts,
                "updatedAt": ts,
            }
            pipe.multi()
            pipe.delete(key)
            pipe.hset(key, mapping=new)
            pipe.sadd(self.keys.llms, new["name"])
            return new

        return await atomically(self.redis, [key], change)

    async def delete_row(self, name: str) -> bool:
        row = await self.get_row(name)
        if row is None:
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.llm(name))
            pipe.srem(self.keys.llms, name)
            if row.get("providerSessionId"):
                pipe.srem(self.keys.session_llms(row["providerSessionId"]), name)
            await pipe.execute()
        return True

    async def mark_woken(self, name: str, now: float) -> bool:
        key = self.keys.llm(name)

        async def change(pipe: Any) -> bool:
            row = _row(await pipe.hgetall(key))
            plan = lifecycle.plan_woken(row, now) if row else None
            if plan is None:
                return False
            pipe.multi()
            pipe.hset(key, mapping=plan)
            return True

        return await atomically(self.redis, [key], change)

    # --- replicas ---------------------------------------------------------------
    async def replica_alive(self, replica: str, ttl: float, now: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.replica(replica), f"{now:.3f}", px=int(ttl * 1000))
            pipe.sadd(self.keys.replicas, replica)
            # Indexes outlive their entries by the retention at most, even if
            # every process dies (the worker normally prunes them first).
            pipe.expire(self.keys.replicas, self.index_ttl)
            pipe.expire(self.keys.replica_sessions(replica), self.index_ttl)
            await pipe.execute()

    async def replica_gone(self, replica: str) -> None:
        """A clean shutdown: no liveness, no inbox left behind."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.replica(replica), self.keys.inbox(replica))
            pipe.srem(self.keys.replicas, replica)
            await pipe.execute()
