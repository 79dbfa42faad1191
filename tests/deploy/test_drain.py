"""The drain's reconnect window, made deterministic: two replicas in this
process on a real redis-server, a scripted publisher, and requests routed
after its replica let it go but before it resumed elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from relay.config import Settings
from relay.connections import connect
from relay.service import Relay
from tests.support.inproc import serve_replica
from tests.support.procs import RedisProcess
from tests.support.scripted import ScriptedPublisher, echo_handler

Pair = tuple[tuple[str, Relay], tuple[str, Relay]]


@pytest.fixture
async def pair(
    redis_proc: RedisProcess, make_settings: Callable[..., Settings], prefix: str
) -> AsyncIterator[Pair]:
    """Replicas A and B sharing one Redis and key prefix."""
    ca, cb = connect(redis_proc.url), connect(redis_proc.url)
    sa = make_settings(redis_prefix=prefix, replica_id=f"a-{prefix}")
    sb = make_settings(redis_prefix=prefix, replica_id=f"b-{prefix}")
    try:
        async with serve_replica(sa, ca) as a, serve_replica(sb, cb) as b:
            yield a, b
    finally:
        await ca.aclose()
        await cb.aclose()


def ask(url: str, model: str, text: str, stream: bool = False) -> asyncio.Task[httpx.Response]:
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(base_url=url, timeout=20) as client:
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "stream": stream,
            }
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.create_task(call())


async def held(relay: Relay, n: int) -> None:
    async with asyncio.timeout(5):
        while relay.handoff.held < n:
            await asyncio.sleep(0.01)


async def test_tasks_routed_while_the_publisher_moves_are_forwarded_not_failed(pair: Pair) -> None:
    (url_a, relay_a), (url_b, _) = pair
    pub = ScriptedPublisher(url_a, handler=echo_handler)
    sid = await pub.connect()
    assert (await pub.register({"name": "x-drain", "type": "openai", "model": "m"})).is_success
    relay_a.begin_drain()
    await pub.next_event("reconnect")
    await asyncio.wait_for(pub.closed.wait(), 5)
    # The session still names A: a request on B goes to A's inbox, one on A
    # finds no channel. Both are held on A, not failed.
    calls = [ask(url_b, "x-drain", "via b"), ask(url_a, "x-drain", "on a", stream=True)]
    await held(relay_a, 2)
    moved = ScriptedPublisher(url_b, handler=echo_handler)
    await moved.connect(resume=sid)  # B binds the session: A forwards to B's inbox
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.status_code for r in replies] == [200, 200], [r.text for r in replies]
    assert replies[0].json()["choices"][0]["message"]["content"] == "echo: via b"
    assert "data: [DONE]" in replies[1].text
    assert relay_a.handoff.held == 0
    # Rows stayed active throughout, and new requests go straight to B.
    reply = await ask(url_b, "x-drain", "after")
    assert reply.json()["choices"][0]["message"]["content"] == "echo: after"
    await pub.aclose()
    await moved.aclose()


async def test_a_publisher_that_never_resumes_fails_held_tasks_with_503(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relay.handoff.HANDOFF_SECONDS", 0.5)
    (url_a, relay_a), (url_b, _) = pair
    pub = ScriptedPublisher(url_a, handler=echo_handler)
    await pub.connect()
    assert (await pub.register({"name": "x-gone", "type": "openai", "model": "m"})).is_success
    relay_a.begin_drain()
    await asyncio.wait_for(pub.closed.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await asyncio.wait_for(ask(url_b, "x-gone", "nobody"), 10)
    assert reply.status_code == 503, reply.text
    assert loop.time() - started < 3
    await pub.aclose()
