"""Tasks whose consumer waits on this replica.

Each pending task has a queue that results, chunk batches and failures are
put on, whether they came from this replica's own routes or from its inbox.
Chunk batches carry their offset, so a batch delivered twice (a publisher
retrying a POST whose answer it lost) reaches the consumer once, and a batch
that overtook an earlier one waits for it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import orjson

# "gone": the consumer closed its connection (put by its own request).
ItemKind = Literal["chunks", "result", "fail", "gone"]


@dataclass(slots=True)
class Item:
    kind: ItemKind
    payload: bytes = b""  # chunks/result: the publisher's JSON body as posted
    status: int = 0  # fail: the HTTP status for the consumer
    message: str = ""  # fail: what went wrong


@dataclass(slots=True)
class Pending:
    task_id: str
    llm: str
    stream: bool
    deadline: float = 0.0  # loop time by which the whole task must be answered
    session_id: str = ""
    principal: str = ""  # the publisher principal that owns the session
    replica: str = ""  # the replica holding the session when routed
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    delivered: int = 0  # chunks passed on to the consumer so far
    ahead: dict[int, list[str]] = field(default_factory=dict)  # batches past a gap
    finished: bool = False  # the consumer is done with it
    answered: bool = False  # a final item (result or fail) reached the consumer
    timed_out: bool = False  # the consumer got a 504

    def put(self, item: Item) -> None:
        if not self.finished:
            self.queue.put_nowait(item)

    def take_chunks(self, payload: bytes) -> list[str]:
        """The chunks the consumer may have now, in stream order.

        Batches can arrive out of order: one delivered on this replica at once
        may overtake an earlier one still in the inbox stream. A batch whose
        ``offset`` is ahead of what was delivered waits here until the gap is
        filled; a batch (or part) already delivered is dropped."""
        batch = orjson.loads(payload)
        chunks: list[str] = batch.get("chunks") or []
        offset = batch.get("offset")
        if not isinstance(offset, int):  # a publisher that sends no offsets: arrival order
            self.delivered += len(chunks)
            return chunks
        if offset > self.delivered:
            self.ahead[offset] = chunks
            return []
        ready = chunks[self.delivered - offset :]
        self.delivered += len(ready)
        while self.ahead:
            first = min(self.ahead)
            if first > self.delivered:
                break
            more = self.ahead.pop(first)[self.delivered - first :]
            ready.extend(more)
            self.delivered += len(more)
        return ready

    def take_rest(self) -> list[str]:
        """At the end of the stream: batches still waiting for a gap that will
        never fill (a lost post). Better late and in order than never."""
        rest: list[str] = []
        for offset in sorted(self.ahead):
            more = self.ahead[offset][max(self.delivered - offset, 0) :]
            rest.extend(more)
            self.delivered = max(self.delivered, offset) + len(more)
        self.ahead.clear()
        return rest


class PendingTasks:
    def __init__(self) -> None:
        self._tasks: dict[str, Pending] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def add(self, pending: Pending) -> None:
        self._tasks[pending.task_id] = pending

    def get(self, task_id: str) -> Pending | None:
        return self._tasks.get(task_id)

    def pop(self, task_id: str) -> Pending | None:
        pending = self._tasks.pop(task_id, None)
        if pending is not None:
            pending.finished = True
        return pending

    def deliver(self, task_id: str, item: Item) -> bool:
        pending = self._tasks.get(task_id)
        if pending is None:
            return False
        pending.put(item)
        return True

    def all(self) -> list[Pending]:
        return list(self._tasks.values())
