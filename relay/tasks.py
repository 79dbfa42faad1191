"""Tasks whose consumer waits on this replica.

Each pending task has a queue that results, chunk batches and failures are
put on, whether they came from this replica's own routes or from its inbox.
Chunk batches carry their offset so a batch delivered twice (a publisher
retrying a POST whose answer it lost) reaches the consumer once.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import orjson

ItemKind = Literal["chunks", "result", "fail"]


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
    finished: bool = False  # the consumer is done with it
    answered: bool = False  # a final item (result or fail) reached the consumer

    def put(self, item: Item) -> None:
        if not self.finished:
            self.queue.put_nowait(item)

    def take_chunks(self, payload: bytes) -> list[str]:
        """The chunks of a posted batch that the consumer has not had yet."""
        batch = orjson.loads(payload)
        chunks: list[str] = batch.get("chunks") or []
        offset = batch.get("offset")
        if isinstance(offset, int) and offset < self.delivered:
            chunks = chunks[self.delivered - offset :]
        self.delivered += len(chunks)
        return chunks


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
