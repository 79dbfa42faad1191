"""Public rows: proxy a consumer request straight to an upstream
OpenAI-compatible server (no publisher involved)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
from starlette.responses import Response, StreamingResponse

from relay.errors import RelayError
from relay.store import Route
from relay.wire import join_url

log = logging.getLogger("relay.upstream")


class Upstream:
    def __init__(self, timeout: float) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def forward(
        self, name: str, route: Route, path: str, body: dict[str, Any], stream: bool
    ) -> Response:
        url = join_url(route.url, path)
        if route.model:
            body = {**body, "model": route.model}
        headers = {"content-type": "application/json"}
        if route.api_key:
            headers["authorization"] = f"Bearer {route.api_key}"
        request = self._client.build_request(
            "POST", url, content=orjson.dumps(body), headers=headers
        )
        try:
            upstream = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise RelayError(
                502,
                f"upstream of {name!r} unreachable: {type(exc).__name__}: {exc}",
                "upstream_error",
            ) from None
        ctype = upstream.headers.get("content-type", "application/json")
        if not stream or upstream.status_code >= 400 or "event-stream" not in ctype:
            try:
                content = await upstream.aread()
            finally:
                await upstream.aclose()
            return Response(content, status_code=upstream.status_code, media_type=ctype)
        return StreamingResponse(
            _relay(upstream), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )


async def _relay(upstream: httpx.Response) -> AsyncIterator[bytes]:
    try:
        async for part in upstream.aiter_raw():
            yield part
    finally:
        await upstream.aclose()
