"""The consumer side: OpenAI-compatible routes (scope ``infer``).

Bodies are parsed once with orjson and passed on as the bytes the consumer
sent; only ``model`` and ``stream`` are read here. Nothing on this path goes
through pydantic: it is the relay's latency.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from starlette.responses import StreamingResponse

from relay.api.deps import authorize, read_json_object, relay_of
from relay.errors import RelayError
from relay.service import Passthrough
from relay.store import Route
from relay.upstream import Upstream
from relay.wire import WAKE_MS_HEADER

router = APIRouter()

# How long a stream may wait for its first chunk before the response starts:
# an error within that time keeps its own HTTP status; after it, the stream
# starts (200) and an error becomes a final error event.
STREAM_HEADSTART_SECONDS = 1.0

_SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    authorize(request, "infer")
    rows = await relay_of(request).store.list_rows()
    data = [
        {
            "id": r["name"],
            "object": "model",
            "created": int(float(r.get("createdAt") or 0)),
            "owned_by": r.get("principal") or "relay",
            "status": r.get("status"),
            "kind": r.get("kind"),
            "description": r.get("description", ""),
        }
        for r in rows
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


# The inference routes are plain Starlette routes, not FastAPI path operations:
# they take the raw Request anyway, and skipping FastAPI's per-request
# dependency solving and endpoint wrapping saves about 15 us a request.
# (They are left out of the generated OpenAPI page as a consequence.)


async def chat_completions(request: Request) -> Response:
    return await _infer(request, "/v1/chat/completions")


async def completions(request: Request) -> Response:
    return await _infer(request, "/v1/completions")


async def embeddings(request: Request) -> Response:
    return await _infer(request, "/v1/embeddings")


router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
router.add_route("/v1/completions", completions, methods=["POST"])
router.add_route("/v1/embeddings", embeddings, methods=["POST"])


def _check(body: dict[str, Any], path: str) -> tuple[str, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RelayError(
            422, "'model' is required: the name of an Llm (see GET /v1/models)", "invalid_model"
        )
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RelayError(422, "'stream' must be true or false", "invalid_stream")
    if path == "/v1/embeddings" and stream:
        raise RelayError(422, "embeddings cannot be streamed", "invalid_stream")
    return model, stream


async def _infer(request: Request, path: str) -> Response:
    authorize(request, "infer")
    relay = relay_of(request)
    raw, body = await read_json_object(request)
    model, stream = _check(body, path)
    if b"\n" in raw or b"\r" in raw:  # the task travels as one SSE data line
        raw = orjson.dumps(body)
    target = await relay.submit(model, path, raw, stream)
    headers: dict[str, str] = {}
    if isinstance(target, Route) and target.outcome == "hibernating":
        loop = asyncio.get_running_loop()
        started = loop.time()
        waking = asyncio.ensure_future(relay.awaken(model, target, path, raw, stream))
        if stream:
            await asyncio.wait({waking}, timeout=STREAM_HEADSTART_SECONDS)
        else:
            await asyncio.wait({waking})
        headers[WAKE_MS_HEADER] = f"{(loop.time() - started) * 1000:.0f}"
        if not waking.done():  # a stream whose Llm still wakes: start it, with comments
            return StreamingResponse(
                relay.stream_waking(model, waking, started),
                media_type="text/event-stream",
                headers={**_SSE_HEADERS, **headers},
            )
        target = waking.result()
    if isinstance(target, Route):
        upstream: Upstream = request.app.state.upstream
        return await upstream.forward(model, target, path, body, stream)
    if not stream:
        status, content = await relay.result(target, request.receive)
        return Response(content, status_code=status, headers=headers, media_type="application/json")
    try:
        first = await relay.first(target, STREAM_HEADSTART_SECONDS)
    except Passthrough as answer:
        return Response(
            answer.body, status_code=answer.status, headers=headers, media_type="application/json"
        )
    return StreamingResponse(
        relay.stream(target, first),
        media_type="text/event-stream",
        headers={**_SSE_HEADERS, **headers},
    )
