"""The hot path's own Redis connection (the "fast lane").

redis-py spends about 100 us of CPU on each command (connection pool, retry
and timeout wrappers, on Python 3.11 a new task per send); a plain protocol
over hiredis spends about 35. The hot-path scripts run several times per
request, so they go through one pipelined connection of their own. redis-py
stays in charge of everything else and of every failure: a lane that
cannot connect, loses its connection, hits a timeout or finds a read-only
replica (a failover) is dropped, the call goes through redis-py (which
waits out the outage), and the lane reconnects in the background, to
wherever redis-py's pool then points.

The inbox reader's blocking XREAD uses the same protocol on a connection of
its own (``BlockingLane``), for the same reason: two reads per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import ResponseError

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] is a dependency
    hiredis = None

log = logging.getLogger("relay.store")

LANE_TIMEOUT_SECONDS = 5.0  # a reply slower than this drops the lane
LANE_RETRY_SECONDS = 1.0  # pause before reconnecting a dropped lane


class LaneDown(Exception):
    """The lane failed; the call must go through redis-py instead."""


class _LaneProtocol(asyncio.Protocol):
    """RESP over one connection: replies come back in request order, so a
    FIFO of futures matches them; writes made in one loop tick go out in
    one send."""

    def __init__(self) -> None:
        assert hiredis is not None
        self.reader = hiredis.Reader()
        # (future, deadline): the reply is overdue after the deadline.
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
                fut.set_exception(LaneDown(f"connection lost: {exc}"))

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

    def call(
        self, args: Sequence[Any], timeout: float = LANE_TIMEOUT_SECONDS
    ) -> asyncio.Future[Any]:
        if self.lost or self.transport is None:
            raise LaneDown("not connected")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(hiredis.pack_command(tuple(args)))
        self.waiting.append((fut, time.monotonic() + timeout))
        return fut

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.lost:
            self.transport.write(b"".join(out))

    def stale(self, now: float) -> bool:
        return bool(self.waiting) and now > self.waiting[0][1]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class _Lane:
    """One lane connection and its upkeep: connect in the background to where
    redis-py's pool points, drop on failure, reconnect later. Only for plain
    TCP connections of redis-py proper: TLS, Unix sockets, credential
    providers and fakeredis (the embedded store) keep the ordinary path."""

    name = "redis lane"
    require_master = False  # check ROLE on connect (a read must not land on a replica)

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._proto: _LaneProtocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        # fakeredis (the embedded store) and wrappers such as arq's keep redis-py.
        self.disabled = hiredis is None or type(redis).__module__ != "redis.asyncio.client"

    def _connected(self) -> _LaneProtocol:
        """The live protocol, or LaneDown (and a reconnect in the background)."""
        proto = self._proto
        if proto is None or proto.lost:
            self._proto = None
            self._start()
            raise LaneDown("not connected")
        return proto

    def drop(self, why: str) -> None:
        if self._proto is not None:
            log.info("%s dropped (%s); redis-py carries its commands meanwhile", self.name, why)
            self._proto.close()
            self._proto = None
        self._retry_at = time.monotonic() + LANE_RETRY_SECONDS

    def _start(self) -> None:
        if self.disabled or self._connecting is not None or time.monotonic() < self._retry_at:
            return
        self._connecting = asyncio.create_task(self._connect(), name=self.name)

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
            setup.append(proto.call(("ROLE",) if self.require_master else ("PING",)))
            replies = await asyncio.wait_for(asyncio.gather(*setup), LANE_TIMEOUT_SECONDS)
            if self.require_master and replies[-1][0] != b"master":
                proto.close()
                raise LaneDown(f"{host}:{port} is not a master")
            self._proto = proto
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.create_task(self._watch(), name=f"{self.name} watchdog")
        except Exception as exc:  # redis-py keeps the commands; try again later
            log.debug("%s not connected: %s", self.name, exc)
            self._retry_at = time.monotonic() + LANE_RETRY_SECONDS
        finally:
            self._connecting = None

    async def _watch(self) -> None:
        """Drop the lane when a reply is overdue (the socket timeout's job)."""
        while True:
            await asyncio.sleep(1.0)
            proto = self._proto
            if proto is not None and proto.stale(time.monotonic()):
                self.drop("reply overdue")

    async def aclose(self) -> None:
        for task in (self._connecting, self._watchdog):
            if task is not None:
                task.cancel()
        if self._proto is not None:
            self._proto.close()
            self._proto = None
        self.disabled = True


class FastLane(_Lane):
    """The hot-path scripts' connection (see the module doc)."""

    name = "redis fast lane"

    async def evalsha(
        self, sha: str, script: bytes, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """Run a loaded script; raises LaneDown when the caller must fall back."""
        proto = self._connected()
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
                raise LaneDown(str(exc)) from None
            raise
        except LaneDown:
            self.drop("connection lost")
            raise


class BlockingLane(_Lane):
    """The inbox reader's blocking XREAD (see the module doc). Any failure,
    an error reply included (UNBLOCKED on a demoted master), raises LaneDown:
    the reader then reads through redis-py, from the same last id."""

    name = "redis inbox lane"
    require_master = True

    async def xread(self, stream: str, last_id: Any, count: int, block_ms: int) -> Any:
        """XREAD's raw reply: None, or ``[[stream, [[id, [field, value, ...]], ...]]]``."""
        proto = self._connected()
        args = ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", stream, last_id)
        try:
            return await proto.call(args, block_ms / 1000 + LANE_TIMEOUT_SECONDS)
        except (LaneDown, ResponseError) as exc:
            self.drop(str(exc) or type(exc).__name__)
            raise LaneDown(str(exc)) from None
