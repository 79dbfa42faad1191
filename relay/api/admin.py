"""Rows as operators see them: list and read (scope ``infer``), and public
rows managed by an admin (scope ``admin``)."""

from __future__ import annotations

import logging
from typing import Annotated

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from relay.api.deps import authorize, read_json_object, relay_of, validated
from relay.api.providers import NAME_PATTERN
from relay.errors import RelayError
from relay.lifecycle import Conflict
from relay.store import public_view

log = logging.getLogger("relay.admin")

router = APIRouter(prefix="/api/v1/llms")


class PublicLlmIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    url: HttpUrl
    model: Annotated[str, Field(min_length=1, max_length=256)]
    type: str = "openai"
    description: Annotated[str, Field(max_length=2000)] = ""
    apiKey: str = ""


def _json(obj: object, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


@router.get("")
async def list_llms(request: Request) -> Response:
    authorize(request, "infer")
    rows = await relay_of(request).store.list_rows()
    return _json({"llms": [public_view(r) for r in rows]})


@router.get("/{name:path}")
async def get_llm(request: Request, name: str) -> Response:
    authorize(request, "infer")
    row = await relay_of(request).store.get_row(name)
    if row is None:
        raise RelayError(404, f"no Llm named {name!r}", "model_not_found")
    return _json(public_view(row))


@router.post("")
async def put_public(request: Request) -> Response:
    principal = authorize(request, "admin")
    _, body = await read_json_object(request)
    data = validated(PublicLlmIn, body)
    relay = relay_of(request)
    fields = {**data.model_dump(), "url": str(data.url).rstrip("/")}
    try:
        row = await relay.store.put_public(fields, relay.clock())
    except Conflict as exc:
        raise RelayError(409, exc.message, "name_conflict") from None

    log.info("public Llm %s set by %s -> %s", row["name"], principal.name, row["url"])
    return _json(public_view(row))


@router.delete("/{name:path}")
async def delete_llm(request: Request, name: str) -> Response:
    principal = authorize(request, "admin")
    if not await relay_of(request).store.delete_row(name):
        raise RelayError(404, f"no Llm named {name!r}", "model_not_found")

    log.info("Llm %s deleted by %s", name, principal.name)
    return Response(status_code=204)
