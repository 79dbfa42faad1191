"""Probes for the load balancer and Kubernetes; no token needed."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from relay.api.deps import relay_of
from relay.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/healthz", include_in_schema=False)
async def healthz() -> Response:
    """The process answers: restart it only when this fails."""
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz", include_in_schema=False)
async def readyz(request: Request) -> Response:
    """Ready for traffic: Redis answers, the inbox reader runs, not draining."""
    relay = relay_of(request)
    if await relay.ready():
        return Response(b'{"status":"ready"}', media_type="application/json")
    reason = "draining" if relay.draining else "store or inbox unavailable"
    return Response(
        b'{"status":"unready","reason":"' + reason.encode() + b'"}',
        status_code=503,
        media_type="application/json",
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this replica (counts and states, no secrets)."""
    return Response(relay_of(request).metrics.render(), media_type=CONTENT_TYPE)
