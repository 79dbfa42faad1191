"""The hot routes, dispatched before FastAPI's middleware stack.

The consumer's inference posts and the publisher's task posts run once per
request (or chunk batch). Through FastAPI they pass its server-error and
exception middleware and the router's route scan: about 30 us of CPU per
request that they do not need. ``RelayApp`` hands them straight to the same
handlers (``relay.api.openai`` and ``relay.api.providers``) and maps their
exceptions with the app's own exception handlers, so responses, error shapes
and the body limit stay exactly those of the ordinary path. Every other
request, and every request when middleware or FastAPI telemetry is in play,
takes the ordinary path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay import wire
from relay.api import openai, providers

Endpoint = Callable[[Request], Awaitable[Response]]

_EXACT: dict[str, Endpoint] = {
    "/v1/chat/completions": openai.chat_completions,
    "/v1/completions": openai.completions,
    "/v1/embeddings": openai.embeddings,
}
_TASK_PREFIX, _, _ = wire.TASK_CHUNKS_PATH.partition("{task_id}")
_TASK: dict[str, Endpoint] = {
    wire.TASK_CHUNKS_PATH.partition("{task_id}")[2]: providers.task_chunks,
    wire.TASK_RESULT_PATH.partition("{task_id}")[2]: providers.task_result,
}
assert wire.TASK_RESULT_PATH.startswith(_TASK_PREFIX)
# The publisher's control channel: not hot for CPU, but its frames live as
# long as the connection, so the middleware it skips is memory per session.
_CHANNEL: tuple[Endpoint, dict[str, Any] | None] = (providers.session, None)


def _hot(path: str) -> tuple[Endpoint, dict[str, Any] | None] | None:
    """The endpoint for a hot path (and its path params), as the router would
    match it (``{task_id}`` is one non-empty segment)."""
    endpoint = _EXACT.get(path)
    if endpoint is not None:
        return endpoint, None
    if not path.startswith(_TASK_PREFIX):
        return None
    task_id, slash, tail = path[len(_TASK_PREFIX) :].partition("/")
    endpoint = _TASK.get(slash + tail)
    if endpoint is None or not task_id:
        return None
    return endpoint, {"task_id": task_id}


class RelayApp(FastAPI):
    """FastAPI, with the hot POST routes and the control channel dispatched
    first (see module doc)."""

    _fast: bool | None = None  # decided on the first request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._fast is not False:
            method = scope["method"]
            hot = (
                _hot(scope["path"])
                if method == "POST"
                else _CHANNEL
                if method == "GET" and scope["path"] == wire.SESSION_PATH
                else None
            )
            if hot is not None and (self._fast or self._decide(scope)):
                await self._dispatch(hot, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _decide(self, scope: Scope) -> bool:
        telemetry = getattr(self, "_native_telemetry", None)
        traced = telemetry is not None and telemetry.enabled()
        self._fast = not (self.user_middleware or self.root_path or traced)
        if "fastapi.telemetry" in scope:
            return False
        return self._fast

    async def _dispatch(
        self,
        hot: tuple[Endpoint, dict[str, Any] | None],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        endpoint, params = hot
        scope["app"] = self
        if params is not None:
            scope["path_params"] = params
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The response the app's exception handlers give ``exc`` (RelayError,
        RedisError, ..., and the catch-all for the rest), as on the ordinary path."""
        for cls in type(exc).__mro__:
            handler = self.exception_handlers.get(cls)
            if handler is not None:
                response: Response = await handler(request, exc)  # type: ignore[misc]
                return response
        raise exc
