"""Redis I/O: rows, sessions, tasks; the Lua scripts of the hot path.

The hot path (route a task, post its chunks, post its result, cancel it) is
one Lua script each: one round trip, atomic. Lifecycle changes (register,
heartbeat, unbind, sweep) read the rows, let ``relay.lifecycle`` decide, and
write under WATCH/MULTI, retrying when a concurrent writer got there first.
Keys come from ``relay.keys``; all of them share one hash slot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ResponseError, WatchError

from relay import lifecycle
from relay.keys import Keys
from relay.lifecycle import Conflict, Lifecycle, Row
from relay.wire import PUBLIC, VIRTUAL, ProviderSpec

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    hiredis = None

log = logging.getLogger("relay.store")


class NotFound(Exception):
    """The session, task or row does not exist (or no longer)."""


class Forbidden(Exception):
    """The caller is not the principal (or session) that owns the object."""


# --- Lua: the hot path -------------------------------------------------------

# Route a consumer request: read the row, and for a live virtual row record
# the task and push it to the inbox of the replica holding the session.
# KEYS[1] llm row. ARGV: tag, taskId, consumerReplica, now, taskTtlMs,
# payload, inboxMaxlen, llmName, kind.
_ROUTE = """
local row = redis.call('HMGET', KEYS[1], 'kind', 'status', 'providerSessionId', 'url', 'apiKey', 'model',
  'wakeMaxWaitSeconds')
if not row[1] then return {'unknown'} end
if row[1] == 'public' then return {'public', row[4] or '', row[5] or '', row[6] or ''} end
if row[2] == 'inactive' then return {'inactive'} end
local sid = row[3]
if ARGV[9] == 'wake' then
  if row[2] == 'active' then return {'awake'} end
elseif row[2] == 'hibernating' then
  return {'hibernating', sid, row[7] or ''}
end
local tag = ARGV[1]
local skey = tag .. ':session:' .. sid
local sess = redis.call('HMGET', skey, 'replica', 'principal')
local replica = sess[1]
if (not replica) or replica == '' or redis.call('EXISTS', tag .. ':replica:' .. replica) == 0 then
  return {'offline', sid}
end
local tkey = tag .. ':task:' .. ARGV[2]
redis.call('HSET', tkey, 'session', sid, 'principal', sess[2], 'replica', ARGV[3],
  'llm', ARGV[8], 'kind', ARGV[9], 'createdAt', ARGV[4])
redis.call('PEXPIRE', tkey, ARGV[5])
local tset = skey .. ':tasks'
redis.call('SADD', tset, ARGV[2])
redis.call('PEXPIRE', tset, ARGV[5])
if replica ~= ARGV[3] then
  redis.call('XADD', tag .. ':inbox:' .. replica, 'MAXLEN', '~', ARGV[7], '*',
    'k', 'task', 's', sid, 't', ARGV[2], 'r', ARGV[3], 'd', ARGV[6])
end
return {'ok', replica, sid, sess[2]}
"""

# A publisher posts for a task: check ownership, optionally finish the task,
# and forward the payload to the inbox of the replica where the consumer waits.
# KEYS[1] task. ARGV: tag, taskId, sessionId, principal, selfReplica,
# messageKind, payload, inboxMaxlen, final ('1' ends the task).
_POST = """
local t = redis.call('HMGET', KEYS[1], 'session', 'principal', 'replica')
if not t[1] then return {'unknown'} end
if t[1] ~= ARGV[3] or t[2] ~= ARGV[4] then return {'forbidden'} end
if ARGV[9] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', ARGV[1] .. ':session:' .. t[1] .. ':tasks', ARGV[2])
end
if t[3] ~= ARGV[5] then
  redis.call('XADD', ARGV[1] .. ':inbox:' .. t[3], 'MAXLEN', '~', ARGV[8], '*',
    'k', ARGV[6], 't', ARGV[2], 'd', ARGV[7])
end
return {'ok', t[3]}
"""

# The consumer is gone (disconnect, timeout): forget the task and tell the
# replica that holds the session now, so the publisher aborts it.
# KEYS[1] task. ARGV: tag, taskId, selfReplica, inboxMaxlen.
_CANCEL = """
local sid = redis.call('HGET', KEYS[1], 'session')
if not sid then return {'none'} end
redis.call('DEL', KEYS[1])
local skey = ARGV[1] .. ':session:' .. sid
redis.call('SREM', skey .. ':tasks', ARGV[2])
local replica = redis.call('HGET', skey, 'replica')
if (not replica) or replica == '' then return {'none'} end
if replica == ARGV[3] then return {'local', sid} end
redis.call('XADD', ARGV[1] .. ':inbox:' .. replica, 'MAXLEN', '~', ARGV[4], '*',
  'k', 'cancel', 's', sid, 't', ARGV[2])
return {'remote', sid}
"""


# --- the hot path's own connection -------------------------------------------------
# redis-py spends about 100 us of CPU on each command (connection pool, retry
# and timeout wrappers, on Python 3.11 a new task per send); a plain protocol
# over hiredis spends about 35. The hot-path scripts run several times per
# request, so they go through one pipelined connection of their own. redis-py
# stays in charge of everything else and of every failure: a lane that
# cannot connect, loses its connection, hits a timeout or finds a read-only
# replica (a failover) is dropped, the call goes through redis-py (which
# waits out the outage), and the lane reconnects in the background, to
# wherever redis-py's pool then points.

LANE_TIMEOUT_SECONDS = 5.0  # a reply slower than this drops the lane
LANE_RETRY_SECONDS = 1.0  # pause before reconnecting a dropped lane


class _LaneDown(Exception):
    """The lane failed; the call must go through redis-py instead."""


class _LaneProtocol(asyncio.Protocol):
    """RESP over one connection: replies come back in request order, so a
    FIFO of futures matches them; writes made in one loop tick go out in
    one send."""

    def __init__(self) -> None:
        assert hiredis is not None
        self.reader = hiredis.Reader()
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        while self.waiting:
            fut, _ = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(_LaneDown(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            if not self.waiting:  # nothing asked for this: out of step, give up
                self.close()
                return
            fut, _ = self.waiting.popleft()
            if fut.done():  # its caller went away; the reply is dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                fut.set_exception(ResponseError(str(reply)))
            else:
                fut.set_result(reply)

    def call(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        if self.lost or self.transport is None:
            raise _LaneDown("not connected")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(hiredis.pack_command(tuple(args)))
        self.waiting.append((fut, time.monotonic()))
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def stale(self, now: float) -> bool:
        return bool(self.waiting) and now - self.waiting[0][1] > LANE_TIMEOUT_SECONDS

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class FastLane:
    """The hot-path scripts' connection (see above). Only for plain TCP
    connections of redis-py proper: TLS, Unix sockets, credential providers
    and fakeredis (the embedded store) keep the ordinary path."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._proto: _LaneProtocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        # fakeredis (the embedded store) and wrappers such as arq's keep redis-py.
        self.disabled = hiredis is None or type(redis).__module__ != "redis.asyncio.client"

    async def evalsha(
        self, sha: str, script: bytes, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """Run a loaded script; raises _LaneDown when the caller must fall back."""
        proto = self._proto
        if proto is None or proto.lost:
            self._proto = None
            self._start()
            raise _LaneDown("not connected")
        try:
            try:
                return await proto.call(("EVALSHA", sha, len(keys), *keys, *args))
            except ResponseError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                return await proto.call(("EVAL", script, len(keys), *keys, *args))
        except ResponseError as exc:
            if str(exc).startswith(("READONLY", "LOADING", "MASTERDOWN")):
                self.drop(str(exc))
                raise _LaneDown(str(exc)) from None
            raise
        except _LaneDown:
            self.drop("connection lost")
            raise

    def drop(self, why: str) -> None:
        if self._proto is not None:
            log.info("redis fast lane dropped (%s); redis-py carries the hot path meanwhile", why)
            self._proto.close()
            self._proto = None
        self._retry_at = time.monotonic() + LANE_RETRY_SECONDS

    def _start(self) -> None:
        if self.disabled or self._connecting is not None or time.monotonic() < self._retry_at:
            return
        self._connecting = asyncio.create_task(self._connect(), name="redis fast lane")

    async def _connect(self) -> None:
        try:
            pool = self._redis.connection_pool
            conn = await pool.get_connection()
            try:
                plain = (
                    isinstance(conn, Connection)
                    and not isinstance(conn, SSLConnection)
                    and type(conn).__module__.startswith("redis.")
                    and getattr(conn, "credential_provider", None) is None
                )
                host, port = conn.host, conn.port
                username, password, db = conn.username, conn.password, conn.db
            finally:
                await pool.release(conn)
            if not plain:
                self.disabled = True
                return
            loop = asyncio.get_running_loop()
            _, proto = await asyncio.wait_for(
                loop.create_connection(_LaneProtocol, host, port), LANE_TIMEOUT_SECONDS
            )
            setup: list[asyncio.Future[Any]] = []
            if password:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                setup.append(proto.call(auth))
            if db:
                setup.append(proto.call(("SELECT", db)))
            setup.append(proto.call(("PING",)))
            await asyncio.wait_for(asyncio.gather(*setup), LANE_TIMEOUT_SECONDS)
            self._proto = proto
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.create_task(self._watch(), name="redis fast lane watchdog")
        except Exception as exc:  # redis-py keeps the hot path; try again later
            log.debug("redis fast lane not connected: %s", exc)
            self._retry_at = time.monotonic() + LANE_RETRY_SECONDS
        finally:
            self._connecting = None

    async def _watch(self) -> None:
        """Drop the lane when a reply is overdue (the socket timeout's job)."""
        while True:
            await asyncio.sleep(1.0)
            proto = self._proto
            if proto is not None and proto.stale(time.monotonic()):
                self.drop(f"no reply within {LANE_TIMEOUT_SECONDS:g} s")

    async def aclose(self) -> None:
        for task in (self._connecting, self._watchdog):
            if task is not None:
                task.cancel()
        if self._proto is not None:
            self._proto.close()
            self._proto = None
        self.disabled = True


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


class Store:
    def __init__(
        self, redis: Redis, keys: Keys, lc: Lifecycle, *, inbox_maxlen: int = 100_000
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.lc = lc
        self.inbox_maxlen = inbox_maxlen
        self._route = redis.register_script(_ROUTE)
        self._post = redis.register_script(_POST)
        self._cancel = redis.register_script(_CANCEL)
        self.lane = FastLane(redis)

    async def aclose(self) -> None:
        """Close the hot path's own connection (the clients are the caller's)."""
        await self.lane.aclose()

    async def _hot(self, script: Any, keys: list[Any], args: list[Any]) -> Any:
        """Run a hot-path script on the fast lane, or through redis-py when
        the lane is not (or no longer) up."""
        try:
            return await self.lane.evalsha(script.sha, script.script, keys, args)
        except _LaneDown:
            return await script(keys=keys, args=args)

    @property
    def _index_ttl(self) -> int:
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
    ) -> str:
        """Check that ``session_id`` of ``principal`` owns the task and forward
        ``payload``; return the replica where the consumer waits."""
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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    sid, where = (_s(x) for x in await pipe.hmget(key, "session", "replica"))
                    if not where:
                        await pipe.reset()
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
                    await pipe.execute()
                    return where
                except WatchError:
                    continue

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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(skey)
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
                    await pipe.execute()
                    return old_replica, old_channel
                except WatchError:
                    continue

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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*row_keys)
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
                    pipe.expire(self.keys.llms, self._index_ttl)
                    pipe.sadd(self.keys.session_llms(sid), *names)
                    pipe.expire(
                        self.keys.session_llms(sid),
                        int(self.lc.heartbeat_timeout + self.lc.inactive_retention),
                    )
                    await pipe.execute()
                    return [
                        {**(row or {}), **plan} for row, plan in zip(current, plans, strict=True)
                    ]
                except WatchError:
                    continue

    async def heartbeat(self, sid: str, principal: str, now: float) -> list[str]:
        """Bump every row ``sid`` owns and revive its inactive ones."""
        await self._check_session(sid, principal)
        names = sorted(_s(n) for n in await self.redis.smembers(self.keys.session_llms(sid)))
        row_keys = [self.keys.llm(n) for n in names]
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if row_keys:
                        await pipe.watch(*row_keys)
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
                    pipe.expire(self.keys.llms, self._index_ttl)
                    await pipe.execute()
                    return owned
                except WatchError:
                    continue

    async def unbind(self, sid: str, channel: str, now: float) -> list[OrphanedTask]:
        """The SSE channel ``channel`` of ``sid`` dropped: unless the session was
        taken over meanwhile, its rows go inactive and its in-flight tasks fail.
        Failures for consumers on other replicas go out through their inboxes;
        the ones returned are all orphaned tasks (the caller fails local ones)."""
        skey = self.keys.session(sid)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(skey, self.keys.session_tasks(sid))
                    if _s(await pipe.hget(skey, "channel")) != channel:
                        await pipe.reset()
                        return []  # taken over by a newer channel: leave it be
                    replica = _s(await pipe.hget(skey, "replica"))
                    orphans = await self._session_fallout(pipe, sid, now)
                    pipe.hset(skey, mapping={"replica": "", "channel": ""})
                    if replica:
                        pipe.srem(self.keys.replica_sessions(replica), sid)
                    await pipe.execute()
                    return orphans
                except WatchError:
                    continue

    async def deactivate_session(self, sid: str, now: float) -> list[OrphanedTask]:
        """The session fell silent or its replica died (housekeeping): rows go
        inactive and in-flight tasks fail, as on a disconnect."""
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(self.keys.session(sid), self.keys.session_tasks(sid))
                    orphans = await self._session_fallout(pipe, sid, now)
                    await pipe.execute()
                    return orphans
                except WatchError:
                    continue

    async def _session_fallout(self, pipe: Any, sid: str, now: float) -> list[OrphanedTask]:
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
                pipe.expire(self.keys.llms, self._index_ttl)  # the index outlives its rows
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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
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
                    await pipe.execute()
                    return new
                except WatchError:
                    continue

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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    row = _row(await pipe.hgetall(key))
                    plan = lifecycle.plan_woken(row, now) if row else None
                    if plan is None:
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.hset(key, mapping=plan)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    # --- replicas ---------------------------------------------------------------
    async def replica_alive(self, replica: str, ttl: float, now: float) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.replica(replica), f"{now:.3f}", px=int(ttl * 1000))
            pipe.sadd(self.keys.replicas, replica)
            # Indexes outlive their entries by the retention at most, even if
            # every process dies (the worker normally prunes them first).
            pipe.expire(self.keys.replicas, self._index_ttl)
            pipe.expire(self.keys.replica_sessions(replica), self._index_ttl)
            await pipe.execute()

    async def replica_gone(self, replica: str) -> None:
        """A clean shutdown: no liveness, no inbox left behind."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.replica(replica), self.keys.inbox(replica))
            pipe.srem(self.keys.replicas, replica)
            await pipe.execute()

    async def delete_if_expired(self, name: str, now: float) -> bool:
        """Delete a row the sweep found past its retention, unless it changed since."""
        key = self.keys.llm(name)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    row = _row(await pipe.hgetall(key))
                    if not row or lifecycle.plan_sweep(row, now, self.lc) != "delete":
                        await pipe.reset()
                        return False
                    pipe.multi()
                    pipe.delete(key)
                    pipe.srem(self.keys.llms, name)
                    if row.get("providerSessionId"):
                        pipe.srem(self.keys.session_llms(row["providerSessionId"]), name)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    # --- housekeeping (relay.housekeeping) ------------------------------------
    # Every change below re-checks its condition under WATCH and reports what
    # its own transaction changed, so that two sweeps running at once do each
    # change exactly once and their reports add up to one sweep's.

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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    row = _row(await pipe.hgetall(key))
                    if not row or lifecycle.plan_sweep(row, now, self.lc) != "deactivate":
                        await pipe.reset()
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
                    await pipe.execute()
                    return flipped, orphans
                except WatchError:
                    continue

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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(live, skey, linked)
                    if await pipe.exists(live):
                        await pipe.reset()
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
                    await pipe.execute()
                    return flipped, orphans
                except WatchError:
                    continue

    async def remove_dead_replica(self, replica: str) -> tuple[bool, bool]:
        """Forget a dead replica once its sessions are released: delete its
        inbox stream and drop it from the registry. Returns (anything
        removed, stream deleted); (False, False) when it came back, still
        has sessions, or another sweep removed it first."""
        live, linked = self.keys.replica(replica), self.keys.replica_sessions(replica)
        inbox = self.keys.inbox(replica)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
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
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    task = _row(await pipe.hgetall(key))
                    if not task:
                        await pipe.reset()
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
                    action = lifecycle.plan_task_sweep(
                        task, now, self.lc, consumer_alive=consumer in alive
                    )
                    if action is None:
                        await pipe.reset()
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
                    await pipe.execute()
                    return action
                except WatchError:
                    continue
