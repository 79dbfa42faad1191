"""This replica's inbox: a Redis stream other replicas XADD to.

One reader task blocks on XREAD (no polling) and hands every entry to the
service's dispatcher. It tracks the last id it read, so a reconnect after a
Redis failover resumes where it stopped instead of skipping what arrived in
between. ``healthy`` tells /readyz whether delivery works: a reader whose
last read failed is disconnected, and one that has not completed a read
within two block periods is stalled (a known failure of Redis-backed
brokers is delivery that silently stops after a failover while health
checks stay green). Its client does not retry by itself (see
``relay.connections``), so a lost connection shows at once.

The reads go over a raw connection of their own when they can
(``relay.store.fastlane.BlockingLane``: redis-py's per-command overhead was
about 130 us of CPU per request, two reads each). Any lane failure, a
timeout included, sends that same read through redis-py from the same last
id, so the health logic above sees exactly what it saw before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.store.fastlane import BlockingLane, LaneDown

log = logging.getLogger("relay.bus")

Message = dict[bytes, bytes]

TRIM_EVERY_SECONDS = 1.0
# Backoff between failed reads: short, so that delivery resumes within about
# a second of Redis (or the new master) answering again.
RETRY_FIRST_SECONDS = 0.05
RETRY_MAX_SECONDS = 1.0
Dispatch = Callable[[Message], None]


class Inbox:
    def __init__(
        self,
        redis: Redis,
        stream: str,
        dispatch: Dispatch,
        *,
        block_seconds: float = 5.0,
        batch: int = 512,
    ) -> None:
        self._redis = redis
        self._stream = stream
        self._dispatch = dispatch
        self._block_ms = int(block_seconds * 1000)
        self._batch = batch
        self._last_id = b"0-0"
        self._last_ok = time.monotonic()
        self._down_since: float | None = None  # set while reads fail
        self._last_trim = 0.0
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._lane = BlockingLane(redis)

    @property
    def healthy(self) -> bool:
        stall = 2 * self._block_ms / 1000 + 1
        return (
            self._task is not None
            and not self._task.done()
            and self._down_since is None
            and time.monotonic() - self._last_ok < stall
        )

    async def start(self) -> None:
        # Start after what is already there: a replica id is fresh per process,
        # so anything older is not for this process.
        try:
            info = await self._redis.xinfo_stream(self._stream)
            self._last_id = info["last-generated-id"]
        except RedisError:
            self._last_id = b"0-0"  # no stream yet
        self._task = asyncio.create_task(self._run(), name=f"inbox {self._stream}")
        await asyncio.wait_for(self._started.wait(), 5)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self._lane.aclose()

    async def _read(self) -> Any:
        """One XREAD from the last id: on the lane if it is up, else (or
        when it fails) through redis-py, whose errors the caller handles."""
        if not self._lane.disabled:
            try:
                raw = await self._lane.xread(
                    self._stream, self._last_id, self._batch, self._block_ms
                )
            except LaneDown:
                pass
            else:
                return raw
        return await self._redis.xread(
            {self._stream: self._last_id}, count=self._batch, block=self._block_ms
        )

    async def _run(self) -> None:
        backoff = RETRY_FIRST_SECONDS
        while True:
            try:
                self._started.set()
                reply = await self._read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or failing over: retry, stay unready
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning(
                        "inbox reader lost Redis (%s): unready, retrying; resumes after %s",
                        exc,
                        self._last_id.decode()
                        if isinstance(self._last_id, bytes)
                        else self._last_id,
                    )
                else:
                    log.debug("inbox read failed again (%s); retrying in %.2f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RETRY_MAX_SECONDS)
                continue
            backoff = RETRY_FIRST_SECONDS
            self._last_ok = time.monotonic()
            if self._down_since is not None:
                log.info(
                    "inbox reader reconnected after %.1f s: delivery resumed",
                    self._last_ok - self._down_since,
                )
                self._down_since = None
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    if type(fields) is list:  # the lane's raw reply: [field, value, ...]
                        fields = dict(zip(fields[::2], fields[1::2], strict=True))
                    try:
                        self._dispatch(fields)
                    except Exception:
                        log.exception("inbox message %s could not be dispatched", entry_id)
            if reply and self._last_ok - self._last_trim > TRIM_EVERY_SECONDS:
                await self._trim()

    async def _trim(self) -> None:
        """Drop what this replica has read: Redis then holds only messages in
        flight (task bodies can be large), not the last MAXLEN of them."""
        self._last_trim = time.monotonic()
        try:
            await self._redis.xtrim(self._stream, minid=self._last_id, approximate=False)
        except Exception as exc:  # best effort: MAXLEN still bounds the stream
            log.debug("inbox trim failed: %s", exc)
