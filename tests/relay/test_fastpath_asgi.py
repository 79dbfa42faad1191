"""The raw-ASGI dispatch of the hot POST routes (``relay.api.fastpath``)
answers exactly as FastAPI's ordinary path does, errors included."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.api.fastpath import RelayApp, _hot
from relay.app import create_app
from relay.auth import Authenticator
from relay.config import Settings
from relay.connections import Clients
from relay.errors import RelayError

TOKENS = [
    {"name": "alice", "token": "pub-token", "scopes": ["publish"]},
    {"name": "carol", "token": "inf-token", "scopes": ["infer"]},
]
INFER = {"authorization": "Bearer inf-token"}
PUBLISH = {"authorization": "Bearer pub-token", "x-relay-session": "nosuchsession"}


@pytest.fixture
async def app(make_settings: Callable[..., Settings], fake_clients: Clients) -> AsyncIterator[Any]:
    app = create_app(
        make_settings(max_body_bytes=1000),
        clients=fake_clients,
        auth=Authenticator.from_config("test", TOKENS),
    )
    async with app.router.lifespan_context(app):
        yield app


async def _both(app: RelayApp, method: str, path: str, **kw: Any) -> httpx.Response:
    """The response on the fast path, checked equal to the ordinary path's."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
        app._fast = None
        fast = await client.request(method, path, **kw)
        assert app._fast is True or _hot(path) is None or method != "POST"
        app._fast = False
        slow = await client.request(method, path, **kw)
        app._fast = None
    assert (fast.status_code, fast.content) == (slow.status_code, slow.content)
    drop = {"content-length", "date"}
    assert {k: v for k, v in fast.headers.items() if k not in drop} == {
        k: v for k, v in slow.headers.items() if k not in drop
    }
    return fast


def test_matches_the_router_paths() -> None:
    assert _hot("/v1/chat/completions") is not None
    assert _hot("/api/v1/_provider-task/abc/chunks") is not None
    assert _hot("/api/v1/_provider-task/abc/result") is not None
    assert _hot("/api/v1/_provider-task//result") is None
    assert _hot("/api/v1/_provider-task/a/b/result") is None
    assert _hot("/v1/models") is None


@pytest.mark.parametrize(
    ("path", "kw", "status"),
    [
        ("/v1/chat/completions", {}, 401),
        ("/v1/chat/completions", {"headers": PUBLISH, "content": b"{}"}, 403),
        ("/v1/chat/completions", {"headers": INFER, "content": b"{"}, 400),
        ("/v1/completions", {"headers": INFER, "content": b"[]"}, 400),
        ("/v1/embeddings", {"headers": INFER, "content": b"{}"}, 422),
        ("/v1/chat/completions", {"headers": INFER, "content": b"x" * 2000}, 413),
        ("/v1/chat/completions", {"headers": INFER, "json": {"model": "nope"}}, 404),
        ("/api/v1/_provider-task/t1/chunks", {"headers": INFER, "json": {}}, 403),
        ("/api/v1/_provider-task/t1/chunks", {"headers": PUBLISH, "json": {"chunks": 1}}, 422),
        ("/api/v1/_provider-task/t1/result", {"headers": PUBLISH, "json": {"status": 0}}, 422),
    ],
)
async def test_errors_match_the_ordinary_path(
    app: RelayApp, path: str, kw: dict[str, Any], status: int
) -> None:
    r = await _both(app, "POST", path, **kw)
    assert r.status_code == status, r.text
    assert "error" in r.json()


async def test_store_errors_and_crashes_map_as_before(
    app: RelayApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = app.state.relay
    body = {"headers": INFER, "json": {"model": "m"}}

    async def down(*_: Any) -> Any:
        raise RedisConnectionError("gone")

    monkeypatch.setattr(relay, "submit", down)
    r = await _both(app, "POST", "/v1/chat/completions", **body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"

    async def crash(*_: Any) -> Any:
        raise ValueError("bug")

    monkeypatch.setattr(relay, "submit", crash)
    r = await _both(app, "POST", "/v1/chat/completions", **body)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"

    async def refused(*_: Any) -> Any:
        raise RelayError(409, "no", "conflict", headers={"Retry-After": "3"})

    monkeypatch.setattr(relay, "submit", refused)
    r = await _both(app, "POST", "/v1/chat/completions", **body)
    assert r.status_code == 409 and r.headers["retry-after"] == "3"


async def test_other_methods_and_routes_take_the_ordinary_path(app: RelayApp) -> None:
    assert (await _both(app, "GET", "/v1/chat/completions")).status_code == 405
    assert (await _both(app, "GET", "/v1/models", headers=INFER)).status_code == 200


async def test_control_channel_errors_match_on_both_paths(app: RelayApp) -> None:
    """The session GET also skips the middleware; its refusals are the same
    (an open channel never ends, so only answers that end are compared)."""
    r = await _both(app, "GET", "/api/v1/providers/session")
    assert r.status_code == 401
    r = await _both(app, "GET", "/api/v1/providers/session", headers=INFER)
    assert r.status_code == 403
    r = await _both(
        app, "GET", "/api/v1/providers/session", params={"sessionId": "bad id!"}, headers=PUBLISH
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_session_id"
