"""Helpers every route uses: who is calling, and the request body within limits.

Plain functions rather than FastAPI dependencies on purpose: the consumer
routes are the hot path, and a direct call costs less than dependency
resolution per request.
"""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import Request
from pydantic import BaseModel, ValidationError

from relay.auth import Authenticator, Principal
from relay.errors import RelayError
from relay.service import Relay


def relay_of(request: Request) -> Relay:
    relay: Relay = request.app.state.relay
    return relay


def authorize(request: Request, scope: str) -> Principal:
    auth: Authenticator = request.app.state.auth
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else None
    principal = auth.principal_for(token)
    if principal is None:
        raise RelayError(
            401,
            "missing or invalid bearer token: send 'Authorization: Bearer <token>'",
            "invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if scope not in principal.scopes:
        raise RelayError(403, f"this token lacks the {scope!r} scope", "insufficient_scope")
    return principal


async def read_body(request: Request) -> bytes:
    """The whole body, refused with 413 as soon as it passes the limit."""
    limit: int = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    parts = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise _too_large(limit)
        parts.append(part)
    return b"".join(parts)


def _too_large(limit: int) -> RelayError:
    return RelayError(413, f"request body is larger than {limit} bytes", "body_too_large")


async def read_json_object(request: Request) -> tuple[bytes, dict[str, Any]]:
    raw = await read_body(request)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RelayError(400, f"request body is not valid JSON: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise RelayError(400, "request body must be a JSON object", "invalid_json")
    return raw, body


def json_response_bytes(obj: object) -> bytes:
    return orjson.dumps(obj)


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: dict[str, Any]) -> M:
    """``body`` as ``model``, or a 422 naming the first invalid field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RelayError(
            422, f"invalid {where or 'body'}: {first['msg']}", "invalid_body"
        ) from None
