"""Ordered, batched delivery of one stream's chunks to the relay.

The first chunk leaves at once (time to first token matters most); while a
POST is in flight, the next chunks pile up and go together in the following
POST. Exactly one POST per task is in flight, so batches arrive in order, and
each carries the ``offset`` of its first chunk so a retried batch is not
delivered twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["ChunkSender", "TaskGone"]

PostChunks = Callable[[list[str], int], Awaitable[bool]]


class TaskGone(Exception):
    """The relay no longer wants this task (404): the consumer went away."""


class ChunkSender:
    """Batches payloads for ``post(chunks, offset)``, which returns False on 404."""

    def __init__(self, post: PostChunks) -> None:
        self._post = post
        self._pending: list[str] = []
        self._offset = 0
        self._ready = asyncio.Event()
        self._closing = False
        self._pump = asyncio.create_task(self._run())
        self.posts = 0
        """Chunks POSTs made: lets tests check that batching happened."""

    @property
    def sent(self) -> int:
        """Chunks acknowledged by the relay so far."""
        return self._offset

    def add(self, payload: str) -> None:
        """Queue one payload; raises the sender's failure if it already failed."""
        if self._pump.done():
            self._pump.result()  # raises TaskGone / RelayError
            raise RuntimeError("chunk sender already closed")
        self._pending.append(payload)
        self._ready.set()

    async def close(self) -> None:
        """Wait until every queued payload is posted; raise what went wrong."""
        self._closing = True
        self._ready.set()
        await self._pump

    async def abort(self) -> None:
        """Stop posting (the task failed or was cancelled)."""
        self._pump.cancel()
        await asyncio.wait([self._pump])
        if not self._pump.cancelled():
            self._pump.exception()  # mark retrieved: the task reports its own failure

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._pending:
                batch, self._pending = self._pending, []
                if not await self._post(batch, self._offset):
                    raise TaskGone()
                self._offset += len(batch)
                self.posts += 1
            elif self._closing:
                return
            if self._pending or self._closing:
                self._ready.set()
