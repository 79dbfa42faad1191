"""Every error leaves the relay in OpenAI's shape, whatever raised it."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from relay.errors import RelayError, error_body, status_type

log = logging.getLogger("relay.api")


def install(app: FastAPI) -> None:
    @app.exception_handler(RelayError)
    async def relay_error(_: Request, exc: RelayError) -> Response:
        return Response(
            exc.body(), status_code=exc.status, headers=exc.headers, media_type="application/json"
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return Response(
            error_body(
                f"invalid {where}: {first['msg']}", "invalid_request_error", "invalid_request"
            ),
            status_code=422,
            media_type="application/json",
        )

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        return Response(
            error_body(str(exc.detail), status_type(exc.status_code), None),
            status_code=exc.status_code,
            headers=exc.headers,
            media_type="application/json",
        )

    @app.exception_handler(RedisError)
    async def store_down(request: Request, exc: RedisError) -> Response:
        log.warning("%s %s: store unavailable: %s", request.method, request.url.path, exc)
        return Response(
            error_body(
                "the relay's store is unavailable (failover in progress?); retry shortly",
                "service_unavailable_error",
                "store_unavailable",
            ),
            status_code=503,
            headers={"Retry-After": "2"},
            media_type="application/json",
        )

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return Response(
            error_body("internal relay error; the relay log has the details", "server_error", None),
            status_code=500,
            media_type="application/json",
        )
