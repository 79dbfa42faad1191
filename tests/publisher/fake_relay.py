"""A fake relay implementing the publisher side of ``relay.wire`` for tests.

It serves the SSE control channel, register and heartbeat, lets a test push
``task`` / ``cancel`` / ``reconnect`` events or drop the stream, and records
every chunk and result post (with the number of chunk posts in flight, to
check the agent never has two at once for a task).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from relay import wire

TOKEN = "test-token"
_DROP = object()


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


@dataclass
class Connection:
    """One SSE connection from the agent."""

    requested: str | None
    """The ``sessionId`` query parameter (None for a fresh session)."""
    session_id: str
    opened_at: float
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Post:
    kind: str  # "chunks" or "result"
    task_id: str
    body: dict[str, Any]
    session: str | None
    at: float


class FakeRelay:
    def __init__(
        self,
        *,
        heartbeat_interval: int = 30,
        ping_interval: float | None = 0.05,
        taken: dict[str, str] | None = None,
    ) -> None:
        self.url = ""
        """Set by the fixture once the server listens."""
        self.heartbeat_interval = heartbeat_interval
        self.ping_interval = ping_interval
        self.taken = dict(taken or {})
        """name -> the 409 body's detail text (names held by someone else)."""
        self.sessions: set[str] = set()
        self.connections: list[Connection] = []
        self.registrations: list[dict[str, Any]] = []
        self.heartbeats: list[tuple[float, str]] = []
        self.posts: list[Post] = []
        self.gone_tasks: set[str] = set()
        """Tasks whose posts answer 404 (finished or cancelled at the relay)."""
        self.reject_chunks = False
        """True: chunk posts answer 422 (a relay that refuses the batch)."""
        self.chunk_delay = 0.0
        """Delay before answering a chunks post, so batches form behind it."""
        self.resume_sessions = True
        """False: a resumed sessionId is not known, a new one is handed out."""
        self.detail_names_conflict = True
        """False: 409 bodies do not name the taken provider."""
        self.inflight: dict[str, int] = defaultdict(int)
        self.max_inflight: dict[str, int] = defaultdict(int)
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        self.app = Starlette(
            routes=[
                Route(wire.SESSION_PATH, self._session, methods=["GET"]),
                Route(wire.REGISTER_PATH, self._register, methods=["POST"]),
                Route(wire.HEARTBEAT_PATH, self._heartbeat, methods=["POST"]),
                Route("/api/v1/_provider-task/{task_id}/chunks", self._chunks, methods=["POST"]),
                Route("/api/v1/_provider-task/{task_id}/result", self._result, methods=["POST"]),
            ]
        )

    # --- test API -------------------------------------------------------------

    @property
    def current(self) -> Connection:
        return self.connections[-1]

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait until ``predicate()`` holds (re-checked on every relay change)."""
        async with asyncio.timeout(within):
            async with self._changed:
                await self._changed.wait_for(predicate)

    async def wait_connections(self, n: int, within: float = 5.0) -> Connection:
        await self.wait_for(lambda: len(self.connections) >= n, within)
        return self.connections[n - 1]

    async def send(self, event: str, data: object) -> None:
        """Push an SSE event on the newest connection."""
        text = orjson.dumps(data).decode()
        await self.current.queue.put(f"event: {event}\ndata: {text}\n\n")

    async def task(
        self,
        task_id: str,
        llm: str,
        body: dict[str, Any],
        *,
        stream: bool = False,
        path: str = "/v1/chat/completions",
    ) -> None:
        await self.send(
            wire.EVENT_TASK,
            {
                "kind": wire.TASK_INFER,
                "taskId": task_id,
                "llmName": llm,
                "path": path,
                "body": body,
                "stream": stream,
            },
        )

    async def wake(self, task_id: str, llm: str) -> None:
        await self.send(
            wire.EVENT_TASK, {"kind": wire.TASK_WAKE, "taskId": task_id, "llmName": llm}
        )

    async def drop(self) -> None:
        """End the newest SSE stream (as a crashed replica or NAT would)."""
        await self.current.queue.put(_DROP)

    def chunk_posts(self, task_id: str) -> list[Post]:
        return [p for p in self.posts if p.task_id == task_id and p.kind == "chunks"]

    def chunks(self, task_id: str) -> list[str]:
        return [c for p in self.chunk_posts(task_id) for c in p.body["chunks"]]

    def result(self, task_id: str) -> dict[str, Any] | None:
        for post in self.posts:
            if post.task_id == task_id and post.kind == "result":
                return post.body
        return None

    async def wait_result(self, task_id: str, within: float = 5.0) -> dict[str, Any]:
        await self.wait_for(lambda: self.result(task_id) is not None, within)
        result = self.result(task_id)
        assert result is not None
        return result

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- routes -----------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {TOKEN}"

    async def _session(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"detail": "bad token"}, 401)
        requested = request.query_params.get("sessionId")
        if requested and requested in self.sessions and self.resume_sessions:
            sid = requested
        else:
            sid = f"sess-{next(self._ids)}"
            self.sessions.add(sid)
        conn = Connection(requested, sid, time.monotonic())
        self.connections.append(conn)
        await self._notify()

        async def events() -> AsyncIterator[bytes]:
            try:
                hello = {"sessionId": sid, "heartbeatIntervalSeconds": self.heartbeat_interval}
                yield b"event: session\ndata: " + orjson.dumps(hello) + b"\n\n"
                while True:
                    try:
                        async with asyncio.timeout(self.ping_interval):
                            item = await conn.queue.get()
                    except TimeoutError:
                        yield b": ping\n\n"
                        continue
                    if item is _DROP:
                        return
                    assert isinstance(item, str)
                    yield item.encode()
            finally:
                conn.closed.set()
                await self._notify()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _register(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"detail": "bad token"}, 401)
        body = orjson.loads(await request.body())
        self.registrations.append(body)
        await self._notify()
        if body.get("sessionId") not in self.sessions:
            return _json({"detail": "unknown session"}, 404)
        for provider in body["providers"]:
            if provider["name"] in self.taken:
                detail = (
                    self.taken[provider["name"]]
                    if self.detail_names_conflict
                    else "a name is held by another publisher"
                )
                return _json({"detail": detail}, 409)
        rows = [
            {"name": p["name"], "status": p.get("initialStatus", "active")}
            for p in body["providers"]
        ]
        return _json({"llms": rows})

    async def _heartbeat(self, request: Request) -> Response:
        if not self._authorized(request):
            return _json({"detail": "bad token"}, 401)
        body = orjson.loads(await request.body())
        sid = body.get("sessionId")
        self.heartbeats.append((time.monotonic(), sid))
        await self._notify()
        if sid not in self.sessions:
            return _json({"detail": "unknown session"}, 404)
        names = [
            p["name"]
            for r in self.registrations
            if r.get("sessionId") == sid
            for p in r["providers"]
        ]
        return _json({"llms": sorted(set(names))})

    async def _task_post(self, request: Request, kind: str) -> Response:
        if not self._authorized(request):
            return _json({"detail": "bad token"}, 401)
        task_id = request.path_params["task_id"]
        body = orjson.loads(await request.body())
        if task_id in self.gone_tasks:
            return _json({"detail": "task finished"}, 404)
        if kind == "chunks" and self.reject_chunks:
            return _json({"detail": "bad chunks"}, 422)
        self.inflight[task_id] += 1
        self.max_inflight[task_id] = max(self.max_inflight[task_id], self.inflight[task_id])
        try:
            if kind == "chunks" and self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
            self.posts.append(
                Post(
                    kind, task_id, body, request.headers.get(wire.SESSION_HEADER), time.monotonic()
                )
            )
        finally:
            self.inflight[task_id] -= 1
        await self._notify()
        return _json({"ok": True})

    async def _chunks(self, request: Request) -> Response:
        return await self._task_post(request, "chunks")

    async def _result(self, request: Request) -> Response:
        return await self._task_post(request, "result")
