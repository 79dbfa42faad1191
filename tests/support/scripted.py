"""A publisher the test drives step by step (no backend, no agent logic), to
exercise the relay's side of the contract precisely."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from relay import wire

Handler = Callable[["ScriptedPublisher", dict[str, Any]], Awaitable[None]]


class ScriptedPublisher:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        post_url: str | None = None,
        handler: Handler | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10)
        # Task posts may go to another replica than the channel.
        self.post_client = httpx.AsyncClient(
            base_url=post_url or base_url, headers=headers, timeout=10
        )
        self.handler = handler
        self.session_id = ""
        self.events: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self.closed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def connect(self, resume: str | None = None) -> str:
        params = {"sessionId": resume} if resume else {}
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed.clear()
        self._reader = asyncio.create_task(self._read(params, ready))
        self.session_id = await asyncio.wait_for(ready, 10)
        return self.session_id

    async def _read(self, params: dict[str, str], ready: asyncio.Future[str]) -> None:
        try:
            async with self.client.stream(
                "GET", wire.SESSION_PATH, params=params, timeout=None
            ) as resp:
                if resp.status_code != 200:
                    body = await resp.aread()
                    ready.set_exception(RuntimeError(f"{resp.status_code}: {body.decode()}"))
                    return
                event = ""
                async for line in resp.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = orjson.loads(line[6:])
                        if event == wire.EVENT_SESSION and not ready.done():
                            self.session_id = data["sessionId"]  # before any task's handler
                            ready.set_result(data["sessionId"])
                        elif event == wire.EVENT_TASK and self.handler is not None:
                            task = asyncio.create_task(self.handler(self, data))
                            self._handlers.add(task)
                            task.add_done_callback(self._handlers.discard)
                        else:
                            await self.events.put((event, data))
        except (httpx.HTTPError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            if not ready.done():
                ready.set_exception(RuntimeError("channel closed before the session event"))

    async def next_event(self, kind: str | None = None, timeout: float = 5) -> dict[str, Any]:
        while True:
            event, data = await asyncio.wait_for(self.events.get(), timeout)
            if kind is None or event == kind:
                return data

    async def register(self, *providers: dict[str, Any]) -> httpx.Response:
        return await self.client.post(
            wire.REGISTER_PATH, json={"sessionId": self.session_id, "providers": list(providers)}
        )

    async def heartbeat(self) -> httpx.Response:
        return await self.client.post(wire.HEARTBEAT_PATH, json={"sessionId": self.session_id})

    async def result(
        self, task_id: str, body: dict[str, Any], session: str | None = None
    ) -> httpx.Response:
        return await self.post_client.post(
            wire.TASK_RESULT_PATH.format(task_id=task_id),
            json=body,
            headers={wire.SESSION_HEADER: session or self.session_id},
        )

    async def chunks(
        self, task_id: str, chunks: list[str], offset: int | None = None
    ) -> httpx.Response:
        body: dict[str, Any] = {"chunks": chunks}
        if offset is not None:
            body["offset"] = offset
        return await self.post_client.post(
            wire.TASK_CHUNKS_PATH.format(task_id=task_id),
            json=body,
            headers={wire.SESSION_HEADER: self.session_id},
        )

    async def disconnect(self) -> None:
        if self._reader is None:
            return  # never connected: only posts
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await asyncio.wait_for(self.closed.wait(), 5)

    async def aclose(self) -> None:
        await self.disconnect()
        for task in list(self._handlers):
            task.cancel()
        await self.client.aclose()
        await self.post_client.aclose()


def chat_chunk(text: str, index: int = 0) -> str:
    """One OpenAI chat.completion.chunk, as the SSE data payload."""
    return orjson.dumps(
        {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
    ).decode()


def chat_completion(text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


async def echo_handler(pub: ScriptedPublisher, task: dict[str, Any]) -> None:
    """Answer every infer task like a backend would: echo the last user message;
    for a stream, one chunk per word."""
    body = task["body"]
    text = ""
    for msg in body.get("messages", []):
        if msg.get("role") == "user":
            text = str(msg.get("content", ""))
    if task["stream"]:
        words = text.split() or [""]
        n = int(body.get("x_chunks", len(words)))
        sent = 0
        while sent < n:
            batch = [
                chat_chunk(f"{i}" if "x_chunks" in body else words[i] + " ")
                for i in range(sent, min(n, sent + 50))
            ]
            await pub.chunks(task["taskId"], batch, offset=sent)
            sent += len(batch)
        await pub.result(task["taskId"], {"status": 200})
    else:
        await pub.result(task["taskId"], {"status": 200, "body": chat_completion(f"echo: {text}")})


class WakingPublisher(ScriptedPublisher):
    """Answers wake tasks as told (after ``release`` is set), infers by echo,
    and records the order in which task kinds arrived."""

    def __init__(self, url: str, *, wake_error: str | None = None, **kw: Any) -> None:
        kw.pop("handler", None)
        super().__init__(url, handler=self._handle, **kw)
        self.kinds: list[str] = []
        self.wake_error = wake_error
        self.release = asyncio.Event()
        self.release.set()
        self.wake_seen = asyncio.Event()

    async def _handle(self, pub: ScriptedPublisher, task: dict[str, Any]) -> None:
        self.kinds.append(task["kind"])
        if task["kind"] == "wake":
            self.wake_seen.set()
            await self.release.wait()
            if self.wake_error:
                await self.result(task["taskId"], {"error": self.wake_error})
            else:
                await self.result(task["taskId"], {"status": 200, "body": {"ok": True, "ms": 3}})
        else:
            await echo_handler(pub, task)
