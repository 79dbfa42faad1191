"""HTTP calls from the agent to one local model server.

Every network-level failure (refused connection, DNS, timeout, a stream cut
short) becomes :class:`BackendUnreachable` with a sentence naming the
provider and its URL; that sentence reaches the consumer through the relay's
502, so it has to say which machine to look at.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from .config import ProviderConfig, WakeVllm
from .httpclient import JSON, dumps
from .sse import SSEDecoder

__all__ = ["Backend", "BackendResponse", "BackendUnreachable"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
HEALTH_TIMEOUT = 5.0
DONE = "[DONE]"


class BackendUnreachable(Exception):
    """The backend could not be reached or broke off; the message says why."""


def parse_body(raw: bytes) -> object:
    """JSON when it parses, else the text as is (the relay passes both on)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace")


class BackendResponse:
    """An open backend response; reads convert failures to BackendUnreachable."""

    def __init__(self, backend: Backend, resp: aiohttp.ClientResponse) -> None:
        self._backend = backend
        self._resp = resp
        self.status = resp.status

    @property
    def is_event_stream(self) -> bool:
        return self._resp.content_type == "text/event-stream"

    async def body(self) -> object:
        try:
            return parse_body(await self._resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._backend.unreachable(exc) from exc

    async def data(self) -> AsyncIterator[str]:
        """Yield each SSE ``data`` payload until ``[DONE]``.

        A stream that breaks (or ends without ``[DONE]`` while the transfer
        was cut) raises BackendUnreachable. A clean end without ``[DONE]`` is
        accepted: some servers omit the sentinel.
        """
        decoder = SSEDecoder()
        try:
            async for chunk in self._resp.content.iter_any():
                for event in decoder.feed(chunk):
                    if event.data == DONE:
                        return
                    if event.event == "message":
                        yield event.data
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._backend.unreachable(exc, streaming=True) from exc
        log.debug("backend %s: stream ended without [DONE]", self._backend.name)


class Backend:
    """One provider's model server."""

    def __init__(self, provider: ProviderConfig, http: aiohttp.ClientSession) -> None:
        self.provider = provider
        self.name = provider.name
        self.base_url = provider.url
        self._http = http
        self._headers = {"Content-Type": JSON}
        if provider.api_key:
            self._headers["Authorization"] = f"Bearer {provider.api_key}"

    def unreachable(self, exc: BaseException, *, streaming: bool = False) -> BackendUnreachable:
        """Build the error sentence for a failure talking to this backend."""
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.provider.request_timeout_seconds:g} s"
        elif isinstance(exc, aiohttp.ClientPayloadError):
            reason = f"stream broken: {exc}"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            reason = "stream broken: server disconnected" if streaming else "server disconnected"
        else:
            reason = str(exc) or type(exc).__name__
        return BackendUnreachable(f"backend {self.name} at {self.base_url} unreachable: {reason}")

    @asynccontextmanager
    async def post(self, path: str, body: dict[str, Any]) -> AsyncIterator[BackendResponse]:
        """POST ``body`` to ``<url><path>``; leaving the block closes the request
        (which is how a cancelled task aborts the backend's work)."""
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=CONNECT_TIMEOUT,
            sock_read=self.provider.request_timeout_seconds,
        )
        try:
            resp = await self._http.post(
                self.base_url + path, data=dumps(body), headers=self._headers, timeout=timeout
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self.unreachable(exc) from exc
        try:
            yield BackendResponse(self, resp)
        except BaseException:
            resp.close()  # drop the connection: the backend sees the abort
            raise
        else:
            resp.release()

    async def request(
        self, method: str, path: str, *, within: float = HEALTH_TIMEOUT
    ) -> tuple[int, object]:
        """A small request (health check, ``/is_sleeping``); failures raise
        BackendUnreachable."""
        try:
            async with self._http.request(
                method,
                self.base_url + path,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=within),
            ) as resp:
                return resp.status, parse_body(await resp.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self.unreachable(exc) from exc

    async def available(self, *, within: float = HEALTH_TIMEOUT) -> tuple[bool, str]:
        """Whether the backend can serve now, and why not.

        The health check (``health``, default ``GET /v1/models``) must answer
        2xx; for a vLLM wake recipe, ``GET /is_sleeping`` must also say false,
        because a sleeping vLLM still answers its health routes.
        """
        provider = self.provider
        try:
            status, _ = await self.request(
                provider.health_method, provider.health_path, within=within
            )
            if not 200 <= status < 300:
                return False, f"{provider.health} answered {status}"
            if isinstance(provider.wake, WakeVllm):
                status, body = await self.request("GET", "/is_sleeping", within=within)
                if status != 200 or not isinstance(body, dict):
                    return False, f"GET /is_sleeping answered {status}"
                if body.get("is_sleeping"):
                    return False, "vLLM is sleeping"
        except BackendUnreachable as exc:
            return False, str(exc)
        return True, "up"
