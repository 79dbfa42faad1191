"""HTTP calls from the agent to the relay (the publisher side of ``relay.wire``).

Every aiohttp or timeout error is turned into :class:`RelayUnavailable` here,
so callers can tell a relay failure from a backend failure without looking at
exception types from the HTTP library.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

import aiohttp
import orjson

from relay import wire

from .httpclient import JSON, dumps
from .sse import SSEDecoder, SSEEvent

__all__ = [
    "RelayClient",
    "RelayError",
    "RelayStatusError",
    "RelayUnavailable",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
CALL_TIMEOUT = 15.0
TASK_POST_RETRIES = (0.1, 0.5, 1.5)  # delays before the 2nd, 3rd and 4th attempt


class RelayError(Exception):
    """The relay could not be reached or refused a call."""


class RelayUnavailable(RelayError):
    """Network failure, timeout or 5xx: worth retrying."""


class RelayStatusError(RelayError):
    """The relay answered a non-retryable error status."""

    def __init__(self, what: str, status: int, body: object) -> None:
        self.status = status
        self.body = body
        detail = body if isinstance(body, str) else orjson.dumps(body).decode()
        super().__init__(f"{what}: relay answered {status} {detail[:300]}")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text


def _parse(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace")


class RelayClient:
    """The relay's publisher API, bound to one base URL and token.

    ``control`` carries the SSE channel, register and heartbeat; ``tasks``
    carries chunk and result posts. Separate pools keep heartbeats on time
    however many tasks are posting.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        control: aiohttp.ClientSession,
        tasks: aiohttp.ClientSession,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {token}"}
        self._control = control
        self._tasks = tasks

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def events(
        self, session_id: str | None, idle_timeout: float
    ) -> AsyncGenerator[SSEEvent, None]:
        """Open the control channel and yield its events until it ends.

        Returns on a clean end of stream; raises :class:`RelayUnavailable` when
        the connection fails or stays silent for ``idle_timeout`` seconds.
        """
        params = {"sessionId": session_id} if session_id else None
        headers = {**self._auth, "Accept": "text/event-stream"}
        timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT)
        try:
            async with self._control.get(
                self._url(wire.SESSION_PATH), params=params, headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    body = _parse(await resp.read())
                    if resp.status >= 500:
                        raise RelayUnavailable(f"session: relay answered {resp.status}")
                    raise RelayStatusError("session", resp.status, body)
                decoder = SSEDecoder()
                while True:
                    try:
                        async with asyncio.timeout(idle_timeout):
                            chunk = await resp.content.readany()
                    except TimeoutError:
                        raise RelayUnavailable(
                            f"no data from the relay for {idle_timeout:g} s"
                        ) from None
                    if not chunk:
                        return
                    for event in decoder.feed(chunk):
                        yield event
        except (aiohttp.ClientError, OSError) as exc:
            raise RelayUnavailable(_describe(exc)) from exc

    async def _post(
        self,
        session: aiohttp.ClientSession,
        path: str,
        payload: object,
        session_id: str | None = None,
        within: float = CALL_TIMEOUT,
    ) -> tuple[int, object]:
        headers = {**self._auth, "Content-Type": JSON}
        if session_id:
            headers[wire.SESSION_HEADER] = session_id
        try:
            async with session.post(
                self._url(path),
                data=dumps(payload),
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=within, connect=CONNECT_TIMEOUT),
            ) as resp:
                return resp.status, _parse(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise RelayUnavailable(_describe(exc)) from exc

    async def register(
        self, session_id: str, providers: Sequence[wire.ProviderSpec]
    ) -> tuple[int, object]:
        """POST register; the caller handles 409 (a name held elsewhere)."""
        payload: wire.RegisterRequest = {"sessionId": session_id, "providers": list(providers)}
        status, body = await self._post(self._control, wire.REGISTER_PATH, payload, session_id)
        if status >= 500:
            raise RelayUnavailable(f"register: relay answered {status}")
        return status, body

    async def heartbeat(self, session_id: str, within: float = CALL_TIMEOUT) -> tuple[int, object]:
        """POST heartbeat; 404 means the relay forgot the session."""
        payload: wire.HeartbeatRequest = {"sessionId": session_id}
        return await self._post(
            self._control, wire.HEARTBEAT_PATH, payload, session_id, within=within
        )

    async def post_task(
        self,
        task_id: str,
        kind: Literal["chunks", "result"],
        payload: wire.ChunksPost | wire.ResultPost,
        session_id: str | None,
    ) -> bool:
        """Post a task's chunks or result, retrying transient failures.

        Returns False when the relay no longer knows the task (404: finished
        or cancelled), so the caller stops working on it. A chunks batch
        re-sent after a lost answer carries the same ``offset``, so the relay
        drops what it already has.
        """
        template = wire.TASK_CHUNKS_PATH if kind == "chunks" else wire.TASK_RESULT_PATH
        path = template.format(task_id=task_id)
        last: str = ""
        for delay in (0.0, *TASK_POST_RETRIES):
            if delay:
                await asyncio.sleep(delay)
            try:
                status, body = await self._post(self._tasks, path, payload, session_id)
            except RelayUnavailable as exc:
                last = str(exc)
                log.debug("task %s: %s post failed (%s), retrying", task_id, kind, last)
                continue
            if status == 404:
                return False
            if status < 300:
                return True
            if status < 500 and status not in (408, 429):
                raise RelayStatusError(f"task {task_id} {kind}", status, body)
            last = f"relay answered {status}"
        raise RelayUnavailable(f"task {task_id}: {kind} post failed: {last}")


def rows(body: object) -> list[Any]:
    """The ``llms`` list of a register or heartbeat answer (empty if absent)."""
    if isinstance(body, dict):
        llms = body.get("llms")
        if isinstance(llms, list):
            return llms
    return []
