"""A toy OpenAI-compatible model server.

It stands in for Ollama / vLLM / llama.cpp in tests, in the relay's ``--demo``
mode and in benchmarks, so it must be fast and need nothing beyond starlette
and orjson. It answers by echoing the last user message (``"echo: <text>"``)
so callers can check that content went through unchanged.

Behaviour knobs, read from extra body fields or, equally, from headers:

=================  =====================  =========================================
body field         header                 effect
=================  =====================  =========================================
``x_chunks``       ``X-Toy-Chunks``       number of stream chunks (payloads before
                                          ``[DONE]``); chunk 0 carries the echo,
                                          chunk *i* carries ``" <i>"``
``x_delay``        ``X-Toy-Delay``        seconds to wait before a reply, or
                                          between two stream chunks
``x_status``       ``X-Toy-Status``       answer this HTTP status with an
                                          OpenAI-shaped error body
``x_break_after``  ``X-Toy-Break-After``  break the connection after that many
                                          stream chunks (no ``[DONE]``)
=================  =====================  =========================================

vLLM-style sleep mode: ``POST /sleep``, ``POST /wake_up``, ``GET /is_sleeping``
(``{"is_sleeping": bool}``). While asleep, inference and ``GET /health``
answer 503; ``GET /v1/models`` keeps answering, as vLLM's does.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = ["ToyStats", "create_toy_backend", "run_toy_backend"]

EMBEDDING_DIM = 8


@dataclass
class ToyStats:
    """Counters tests read to see what the backend went through."""

    requests: int = 0
    """Inference requests received (chat, completions, embeddings)."""
    active: int = 0
    """Inference requests being answered right now."""
    max_active: int = 0
    """Highest ``active`` seen: checks a client's concurrency limit."""
    completed: int = 0
    """Inference requests answered to the end."""
    disconnects: int = 0
    """Streams the client abandoned before the end."""
    wake_ups: int = 0
    """``POST /wake_up`` calls."""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    """Every inference request body, in arrival order."""
    headers: list[dict[str, str]] = field(default_factory=list)
    """Every inference request's headers, in arrival order."""


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json({"error": {"message": message, "type": kind, "code": status}}, status)


class _Knobs:
    """The test knobs of one request (body fields win over headers)."""

    def __init__(self, body: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        def pick(name: str, header: str) -> Any:
            if name in body:
                return body[name]
            return headers.get(header)

        chunks = pick("x_chunks", "x-toy-chunks")
        delay = pick("x_delay", "x-toy-delay")
        status = pick("x_status", "x-toy-status")
        brk = pick("x_break_after", "x-toy-break-after")
        self.chunks: int | None = None if chunks is None else int(chunks)
        self.delay: float = 0.0 if delay is None else float(delay)
        self.status: int | None = None if status is None else int(status)
        self.break_after: int | None = None if brk is None else int(brk)


def _last_user_text(messages: object) -> str:
    """The text of the last user message (string or list of content parts)."""
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return "".join(
                    str(part.get("text", ""))
                    for part in content
                    if isinstance(part, dict) and part.get("type") == "text"
                )
    return ""


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, list):
        return str(prompt[-1]) if prompt else ""
    return "" if prompt is None else str(prompt)


def _pieces(reply: str, chunks: int | None) -> list[str]:
    """Split a reply into stream pieces: words by default, else ``chunks`` pieces."""
    if chunks is None:
        words = reply.split(" ")
        return [words[0]] + [" " + w for w in words[1:]]
    return [reply] + [f" {i}" for i in range(1, chunks)] if chunks > 0 else []


def _usage(prompt: str, reply: str) -> dict[str, int]:
    p, c = len(prompt.split()), len(reply.split())
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _embedding(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [round(b / 255.0, 6) for b in digest[:EMBEDDING_DIM]]


def create_toy_backend(
    *,
    model: str = "toy-model",
    asleep: bool = False,
    wake_delay: float = 0.0,
    stats: ToyStats | None = None,
    record: bool = True,
) -> Starlette:
    """Build the toy backend app; ``app.state.stats`` holds its :class:`ToyStats`.

    ``model`` is the id ``/v1/models`` lists (any requested model is accepted
    and echoed back); ``asleep`` starts it in sleep mode; ``wake_delay``
    is how long it stays asleep after ``POST /wake_up`` (a model loading).
    ``app.state.toy`` is the mutable state (``{"asleep": bool}``).
    ``record=False`` keeps no bodies or headers in the stats (counters only):
    a long-running server (the benchmark, ``--demo``) must not grow forever.
    """
    counters = stats if stats is not None else ToyStats()
    state = {"asleep": asleep}

    async def read_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        data = orjson.loads(raw)
        return data if isinstance(data, dict) else {}

    async def guarded(request: Request) -> tuple[dict[str, Any], _Knobs] | Response:
        """Parse, record and apply the error knobs common to every inference route."""
        try:
            body = await read_body(request)
        except orjson.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        counters.requests += 1
        if record:
            counters.bodies.append(body)
            counters.headers.append(dict(request.headers))
        try:
            knobs = _Knobs(body, request.headers)
        except (TypeError, ValueError) as exc:
            return _error(400, f"bad toy knob: {exc}")
        if state["asleep"]:
            return _error(503, "model is sleeping")
        if knobs.status is not None:
            if knobs.delay:
                await asyncio.sleep(knobs.delay)
            return _error(knobs.status, f"toy error {knobs.status} as requested")
        return body, knobs

    async def answer(knobs: _Knobs, reply: dict[str, Any]) -> Response:
        counters.active += 1
        counters.max_active = max(counters.max_active, counters.active)
        try:
            if knobs.delay:
                await asyncio.sleep(knobs.delay)
        finally:
            counters.active -= 1
        counters.completed += 1
        return _json(reply)

    def stream(
        knobs: _Knobs, chunks: list[dict[str, Any]], final: dict[str, Any] | None
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[bytes]:
            counters.active += 1
            counters.max_active = max(counters.max_active, counters.active)
            finished = False
            try:
                for i, chunk in enumerate(chunks):
                    if knobs.break_after is not None and i >= knobs.break_after:
                        raise ConnectionAbortedError("toy backend breaks the stream on request")
                    if knobs.delay and i:
                        await asyncio.sleep(knobs.delay)
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                if final is not None:
                    yield b"data: " + orjson.dumps(final) + b"\n\n"
                yield b"data: [DONE]\n\n"
                finished = True
            finally:
                counters.active -= 1
                if finished:
                    counters.completed += 1
                elif knobs.break_after is None:
                    counters.disconnects += 1

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )

    async def chat_completions(request: Request) -> Response:
        parsed = await guarded(request)
        if isinstance(parsed, Response):
            return parsed
        body, knobs = parsed
        prompt = _last_user_text(body.get("messages"))
        reply = f"echo: {prompt}"
        name = str(body.get("model", model))
        cid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        if not body.get("stream"):
            return await answer(
                knobs,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(prompt, reply),
                },
            )
        pieces = _pieces(reply, knobs.chunks)
        chunks = []
        for i, piece in enumerate(pieces):
            delta: dict[str, Any] = {"content": piece}
            if i == 0:
                delta["role"] = "assistant"
            chunks.append(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [
                        {
                            "index": 0,
                            "delta": delta,
                            "finish_reason": "stop" if i == len(pieces) - 1 else None,
                        }
                    ],
                }
            )
        final = None
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            final = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [],
                "usage": _usage(prompt, "".join(pieces)),
            }
        return stream(knobs, chunks, final)

    async def completions(request: Request) -> Response:
        parsed = await guarded(request)
        if isinstance(parsed, Response):
            return parsed
        body, knobs = parsed
        prompt = _prompt_text(body.get("prompt"))
        reply = f"echo: {prompt}"
        name = str(body.get("model", model))
        cid = f"cmpl-{uuid.uuid4().hex[:16]}"
        created = int(time.time())
        if not body.get("stream"):
            return await answer(
                knobs,
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": name,
                    "choices": [
                        {"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}
                    ],
                    "usage": _usage(prompt, reply),
                },
            )
        pieces = _pieces(reply, knobs.chunks)
        chunks = [
            {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "text": piece,
                        "logprobs": None,
                        "finish_reason": "stop" if i == len(pieces) - 1 else None,
                    }
                ],
            }
            for i, piece in enumerate(pieces)
        ]
        return stream(knobs, chunks, None)

    async def embeddings(request: Request) -> Response:
        parsed = await guarded(request)
        if isinstance(parsed, Response):
            return parsed
        body, knobs = parsed
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) else [raw]
        data = [
            {"object": "embedding", "index": i, "embedding": _embedding(str(text))}
            for i, text in enumerate(inputs)
        ]
        tokens = sum(len(str(text).split()) for text in inputs)
        return await answer(
            knobs,
            {
                "object": "list",
                "data": data,
                "model": str(body.get("model", model)),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            },
        )

    async def models(request: Request) -> Response:
        return _json(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": 0, "owned_by": "toy"}],
            }
        )

    async def health(request: Request) -> Response:
        if state["asleep"]:
            return _json({"status": "sleeping"}, 503)
        return _json({"status": "ok"})

    async def sleep(request: Request) -> Response:
        state["asleep"] = True
        return _json({"ok": True})

    async def wake_up(request: Request) -> Response:
        counters.wake_ups += 1
        if wake_delay:
            asyncio.get_running_loop().call_later(wake_delay, state.update, {"asleep": False})
        else:
            state["asleep"] = False
        return _json({"ok": True})

    async def is_sleeping(request: Request) -> Response:
        return _json({"is_sleeping": state["asleep"]})

    app = Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/sleep", sleep, methods=["POST"]),
            Route("/wake_up", wake_up, methods=["POST"]),
            Route("/is_sleeping", is_sleeping, methods=["GET"]),
        ]
    )
    app.state.stats = counters
    app.state.toy = state
    return app


def run_toy_backend(host: str = "127.0.0.1", port: int = 8001, *, model: str = "toy-model") -> None:
    """Serve the toy backend with uvicorn until interrupted (blocking).

    No access log and no recorded bodies: this is the long-running form
    (manual use, the benchmark), where per-request bookkeeping would only
    cost time and memory."""
    import uvicorn

    uvicorn.run(
        create_toy_backend(model=model, record=False),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description="A toy OpenAI-compatible model server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--model", default="toy-model")
    args = parser.parse_args()
    run_toy_backend(args.host, args.port, model=args.model)
