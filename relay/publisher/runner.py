"""Execution of the tasks the relay sends: forward to the backend, post back.

Each task runs in its own asyncio task so the SSE reader and the heartbeat
never wait for one. A semaphore per provider enforces ``maxConcurrency``;
tasks beyond it wait here in FIFO order (asyncio semaphores are fair), not
at the backend, whose queueing we cannot see or cancel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from relay import wire

from .backend import Backend, BackendResponse, BackendUnreachable
from .chunks import ChunkSender, TaskGone
from .config import ProviderConfig
from .relay_client import RelayClient, RelayError

__all__ = ["ProviderRuntime", "TaskRunner"]

log = logging.getLogger(__name__)

RESULT_POST_TIMEOUT = 10.0
"""Bound on the error post made for a task aborted at shutdown."""


@dataclass
class ProviderRuntime:
    """A provider's live state: its backend client and its concurrency slots."""

    config: ProviderConfig
    backend: Backend
    slots: asyncio.Semaphore

    @property
    def name(self) -> str:
        return self.config.name


WakeHandler = Callable[[ProviderRuntime, str], Awaitable[wire.ResultPost]]
"""Runs a wake task ``(provider, task_id)`` and returns the result to post."""


class TaskRunner:
    """Runs tasks concurrently and makes sure each ends with one result post."""

    def __init__(
        self,
        relay: RelayClient,
        providers: Mapping[str, ProviderRuntime],
        session_id: Callable[[], str | None],
        wake: WakeHandler,
    ) -> None:
        self._relay = relay
        self._providers = providers
        self._session_id = session_id
        self._wake = wake
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop_reason: dict[str, Literal["cancel", "shutdown"]] = {}
        self._accepting = True
        self._abort = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def running(self) -> int:
        """Tasks accepted and not finished (running or waiting for a slot)."""
        return len(self._tasks)

    def submit(self, task: Mapping[str, Any]) -> None:
        """Start a task from an SSE ``task`` event; never blocks."""
        task_id = task.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            log.warning("ignoring a task event without taskId: %.200r", task)
            return
        if task_id in self._tasks:
            log.info("task %s: already running, ignoring the repeated event", task_id)
            return
        if not self._accepting:
            log.info("task %s: refused, the publisher is shutting down", task_id)
            self._spawn_post(task_id, {"error": "publisher is shutting down"})
            return
        runner = asyncio.create_task(self._run(task_id, task), name=f"relay-task-{task_id}")
        self._tasks[task_id] = runner
        runner.add_done_callback(lambda _: self._tasks.pop(task_id, None))

    def cancel(self, task_id: str) -> None:
        """The consumer went away: abort the backend request, post nothing."""
        runner = self._tasks.get(task_id)
        if runner is None:
            log.debug("task %s: cancel for a task not running here", task_id)
            return
        log.info("task %s: cancelled by the relay", task_id)
        self._stop_reason[task_id] = "cancel"
        runner.cancel()

    def abort(self) -> None:
        """Cut the shutdown grace short (second SIGINT)."""
        self._abort.set()

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let running tasks finish for ``grace`` seconds (or
        until :meth:`abort`), then abort the rest with an error result each."""
        self._accepting = False
        pending = set(self._tasks.values())
        if pending:
            log.info("waiting up to %g s for %d running task(s)", grace, len(pending))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            aborted = asyncio.create_task(self._abort.wait())
            while pending and not self._abort.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    pending | {aborted}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
            aborted.cancel()
        if pending:
            log.warning("aborting %d task(s) still running", len(pending))
            for task_id, runner in list(self._tasks.items()):
                if runner in pending:
                    self._stop_reason[task_id] = "shutdown"
                    runner.cancel()
            await asyncio.wait(pending)
        if self._background:
            await asyncio.wait(self._background, timeout=RESULT_POST_TIMEOUT)

    # --- one task ---------------------------------------------------------------

    async def _run(self, task_id: str, task: Mapping[str, Any]) -> None:
        started = time.monotonic()
        name = task.get("llmName")
        kind = task.get("kind")
        result: wire.ResultPost
        try:
            provider = self._providers.get(name) if isinstance(name, str) else None
            if provider is None:
                result = {"error": f"no provider named {name!r} in this publisher"}
            elif kind == wire.TASK_INFER:
                result = await self._infer(task_id, provider, task)
            elif kind == wire.TASK_WAKE:
                result = await self._wake(provider, task_id)
            else:
                result = {"error": f"unknown task kind {kind!r}"}
        except asyncio.CancelledError:
            reason = self._stop_reason.pop(task_id, None)
            if reason == "cancel":
                return
            if reason == "shutdown":
                await self._post_result(
                    task_id, {"error": "publisher shut down before the task finished"}
                )
                return
            raise
        except TaskGone:
            log.info("task %s: the relay no longer wants it (404), stopped", task_id)
            return
        except RelayError as exc:
            log.error("task %s (%s): cannot deliver chunks to the relay: %s", task_id, name, exc)
            result = {"error": f"publisher could not deliver the stream to the relay: {exc}"}
        except Exception as exc:  # a bug here must still end the task
            log.exception("task %s (%s): unexpected error", task_id, name)
            result = {"error": f"publisher error: {type(exc).__name__}: {exc}"}
        ms = (time.monotonic() - started) * 1000
        outcome = result.get("error") or f"status {result.get('status')}"
        log.info("task %s (%s %s) done in %.0f ms: %s", task_id, kind, name, ms, outcome)
        await self._post_result(task_id, result)

    async def _infer(
        self, task_id: str, provider: ProviderRuntime, task: Mapping[str, Any]
    ) -> wire.ResultPost:
        path = task.get("path")
        raw_body = task.get("body")
        if not isinstance(path, str) or not path.startswith("/"):
            return {"error": f"bad task path {path!r}"}
        if not isinstance(raw_body, dict):
            return {"error": "task body is not a JSON object"}
        body = dict(raw_body)
        body["model"] = provider.config.model
        stream = bool(task.get("stream"))
        if stream:
            body["stream"] = True
        if provider.slots.locked():
            log.debug("task %s (%s): waiting for a free slot", task_id, provider.name)
        async with provider.slots:
            try:
                async with provider.backend.post(path, body) as resp:
                    if stream and resp.status == 200 and resp.is_event_stream:
                        return await self._stream(task_id, resp)
                    return {"status": resp.status, "body": await resp.body()}
            except BackendUnreachable as exc:
                return {"error": str(exc)}

    async def _stream(self, task_id: str, resp: BackendResponse) -> wire.ResultPost:
        async def post(chunks: list[str], offset: int) -> bool:
            payload: wire.ChunksPost = {"chunks": chunks, "offset": offset}
            return await self._relay.post_task(task_id, "chunks", payload, self._session_id())

        sender = ChunkSender(post)
        try:
            async for payload in resp.data():
                if "\n" in payload or "\r" in payload:
                    # A multi-line data event: the relay takes one line per
                    # chunk, and JSON means the same with spaces for newlines.
                    payload = payload.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
                sender.add(payload)
        except BackendUnreachable:
            await sender.close()  # deliver what came before the break, then the error
            raise
        except BaseException:
            await sender.abort()
            raise
        await sender.close()
        log.debug("task %s: %d chunks in %d posts", task_id, sender.sent, sender.posts)
        return {"status": 200}

    # --- result posts -------------------------------------------------------------

    async def _post_result(self, task_id: str, result: wire.ResultPost) -> None:
        try:
            async with asyncio.timeout(RESULT_POST_TIMEOUT * 3):
                delivered = await self._relay.post_task(
                    task_id, "result", result, self._session_id()
                )
        except (RelayError, TimeoutError) as exc:
            log.error("task %s: result not delivered to the relay: %s", task_id, exc)
            return
        if not delivered:
            log.info("task %s: the relay had already finished it (404)", task_id)

    def _spawn_post(self, task_id: str, result: wire.ResultPost) -> None:
        post = asyncio.create_task(self._post_result(task_id, result))
        self._background.add(post)
        post.add_done_callback(self._background.discard)
