"""The publisher side of the contract (scope ``publish``): the control
channel, registration, heartbeats, and task posts."""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from relay import wire
from relay.api.control import ChannelResponse
from relay.api.deps import authorize, read_json_object, relay_of, validated
from relay.errors import RelayError

router = APIRouter()

_OK = b'{"ok":true}'
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"


class ProviderIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    type: str = "openai"
    model: Annotated[str, Field(min_length=1, max_length=256)]
    description: Annotated[str, Field(max_length=2000)] = ""
    initialStatus: Literal["active", "hibernating"] = "active"
    wakeMaxWaitSeconds: Annotated[float | None, Field(gt=0)] = None


class RegisterIn(BaseModel):
    sessionId: str
    providers: Annotated[list[ProviderIn], Field(min_length=1, max_length=256)]

    @field_validator("providers")
    @classmethod
    def _unique(cls, v: list[ProviderIn]) -> list[ProviderIn]:
        names = [p.name for p in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate provider name(s): {', '.join(dupes)}")
        return v


class HeartbeatIn(BaseModel):
    sessionId: str


async def session(request: Request) -> Response:
    """The control channel (``?sessionId=`` resumes). A plain route, also
    dispatched before FastAPI's middleware (``relay.api.fastpath``): the
    request's frames stay alive as long as the channel, on every idle
    publisher connection, so each layer saved is memory per session."""
    principal = authorize(request, "publish")
    relay = relay_of(request)
    channel = await relay.open_channel(principal, request.query_params.get("sessionId"))

    def unbind() -> None:
        # The request scope may be being cancelled: unbind in a task of its own.
        relay.spawn(relay.close_channel(channel), f"unbind {channel.session_id}")

    return ChannelResponse(
        channel, unbind, headers={"cache-control": "no-cache", "x-accel-buffering": "no"}
    )


@router.post(wire.REGISTER_PATH)
async def register(request: Request) -> Response:
    principal = authorize(request, "publish")
    _, body = await read_json_object(request)
    data: RegisterIn = validated(RegisterIn, body)
    specs: list[wire.ProviderSpec] = [p.model_dump(exclude_none=True) for p in data.providers]  # type: ignore[misc]
    rows = await relay_of(request).register(principal, data.sessionId, specs)
    return Response(orjson.dumps({"llms": rows}), media_type="application/json")


@router.post(wire.HEARTBEAT_PATH)
async def heartbeat(request: Request) -> Response:
    principal = authorize(request, "publish")
    _, body = await read_json_object(request)
    data: HeartbeatIn = validated(HeartbeatIn, body)
    names = await relay_of(request).heartbeat(principal, data.sessionId)
    return Response(orjson.dumps({"llms": names}), media_type="application/json")


def _session_header(request: Request) -> str:
    sid = request.headers.get(wire.SESSION_HEADER)
    if not sid:
        raise RelayError(400, f"missing {wire.SESSION_HEADER} header", "missing_session")
    return sid


# The task posts are plain Starlette routes (see relay.api.openai): they are
# the publisher's hot path, once per result and per chunk batch.


async def task_chunks(request: Request) -> Response:
    task_id: str = request.path_params["task_id"]
    principal = authorize(request, "publish")
    sid = _session_header(request)
    raw, body = await read_json_object(request)
    chunks = body.get("chunks")
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise RelayError(422, "'chunks' must be a list of strings", "invalid_body")
    offset = body.get("offset")
    if offset is not None and (not isinstance(offset, int) or offset < 0):
        raise RelayError(422, "'offset' must be a non-negative integer", "invalid_body")
    if any("\n" in c or "\r" in c for c in chunks):
        raise RelayError(
            422, "a chunk must be a single line (one SSE data payload)", "invalid_body"
        )
    await relay_of(request).post_chunks(principal, sid, task_id, raw, ordered=offset is not None)
    return Response(_OK, media_type="application/json")


async def task_result(request: Request) -> Response:
    task_id: str = request.path_params["task_id"]
    principal = authorize(request, "publish")
    sid = _session_header(request)
    raw, body = await read_json_object(request)
    if "error" in body:
        if not isinstance(body["error"], str):
            raise RelayError(422, "'error' must be a string", "invalid_body")
    else:
        status = body.get("status")
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise RelayError(
                422, "'status' must be an HTTP status code, or send 'error'", "invalid_body"
            )
    await relay_of(request).post_result(principal, sid, task_id, raw)
    return Response(_OK, media_type="application/json")


router.add_route(wire.SESSION_PATH, session, methods=["GET"])
router.add_route(wire.TASK_CHUNKS_PATH, task_chunks, methods=["POST"])
router.add_route(wire.TASK_RESULT_PATH, task_result, methods=["POST"])
