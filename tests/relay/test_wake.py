"""Hibernating rows, relay half, on one in-process replica (fakeredis): the
four basic cases of the wake issue plus streaming comments and limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from relay.config import Settings
from relay.connections import Clients, connect
from relay.service import Relay
from tests.support.inproc import serve_replica
from tests.support.scripted import WakingPublisher

SLEEPY = {
    "name": "sleepy",
    "type": "openai",
    "model": "m",
    "initialStatus": "hibernating",
    "wakeMaxWaitSeconds": 5,
}


@pytest.fixture(params=["fakeredis", "redis-server"])
async def replica(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], fake_clients: Clients
) -> AsyncIterator[tuple[str, Relay]]:
    """The basic cases run on both stores: fakeredis and a real redis-server."""
    clients = fake_clients
    if request.param == "redis-server":
        clients = connect(request.getfixturevalue("redis_proc").url)
    try:
        async with serve_replica(make_settings(task_timeout_seconds=10), clients) as r:
            yield r
    finally:
        if clients is not fake_clients:
            await clients.aclose()


async def sleepy(url: str, **kw: Any) -> WakingPublisher:
    pub = WakingPublisher(url, handler=None, **kw)
    await pub.connect()
    r = await pub.register(SLEEPY)
    assert r.status_code == 200 and r.json()["llms"][0]["status"] == "hibernating"
    return pub


def ask(url: str) -> Any:
    return httpx.AsyncClient(base_url=url, timeout=20).post(
        "/v1/chat/completions",
        json={"model": "sleepy", "messages": [{"role": "user", "content": "hi"}]},
    )


async def test_wake_then_infer_in_that_order(replica: tuple[str, Relay]) -> None:
    url, relay = replica
    pub = await sleepy(url)
    r = await ask(url)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert int(r.headers["x-relay-wake-ms"]) >= 0
    assert pub.kinds == ["wake", "infer"]
    assert (await relay.store.get_row("sleepy") or {})["status"] == "active"
    r2 = await ask(url)  # awake now: no second wake, no header
    assert r2.status_code == 200 and "x-relay-wake-ms" not in r2.headers
    assert pub.kinds == ["wake", "infer", "infer"]
    await pub.aclose()


async def test_three_parallel_infers_make_one_wake(replica: tuple[str, Relay]) -> None:
    url, _ = replica
    pub = await sleepy(url)
    pub.release.clear()
    calls = [asyncio.create_task(ask(url)) for _ in range(3)]
    await asyncio.wait_for(pub.wake_seen.wait(), 5)
    pub.release.set()
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.status_code for r in replies] == [200, 200, 200]
    assert pub.kinds.count("wake") == 1 and pub.kinds.count("infer") == 3
    await pub.aclose()


async def test_wake_failure_reaches_every_waiter_and_leaves_row_hibernating(
    replica: tuple[str, Relay],
) -> None:
    url, relay = replica
    pub = await sleepy(
        url, wake_error="systemctl start ollama: exit 5: Unit ollama.service not found"
    )
    pub.release.clear()
    calls = [asyncio.create_task(ask(url)) for _ in range(3)]
    await asyncio.wait_for(pub.wake_seen.wait(), 5)
    pub.release.set()
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    for r in replies:
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "wake_failed"
        assert "Unit ollama.service not found" in r.json()["error"]["message"]
    assert pub.kinds == ["wake"]
    assert (await relay.store.get_row("sleepy") or {})["status"] == "hibernating"
    # The next request tries a new wake.
    pub.wake_error = None
    assert (await ask(url)).status_code == 200
    assert pub.kinds == ["wake", "wake", "infer"]
    await pub.aclose()


async def test_inactive_is_not_hibernating(replica: tuple[str, Relay]) -> None:
    url, relay = replica
    pub = await sleepy(url)
    await pub.disconnect()
    async with asyncio.timeout(5):
        while (await relay.store.get_row("sleepy") or {}).get("status") != "inactive":
            await asyncio.sleep(0.01)
    r = await ask(url)
    assert r.status_code == 503 and r.json()["error"]["code"] == "provider_offline"
    assert pub.kinds == []
    await pub.aclose()


async def test_publisher_dying_during_wake_fails_every_waiter_promptly(
    replica: tuple[str, Relay],
) -> None:
    url, relay = replica
    pub = await sleepy(url)
    pub.release.clear()  # the wake never completes
    calls = [asyncio.create_task(ask(url)) for _ in range(3)]
    await asyncio.wait_for(pub.wake_seen.wait(), 5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await pub.disconnect()
    replies = await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert loop.time() - start < 1.0
    assert all(r.status_code == 503 and r.json()["error"]["code"] == "wake_failed" for r in replies)
    assert (await relay.store.get_row("sleepy") or {})["status"] == "inactive"
    await pub.aclose()


async def test_stream_gets_comments_while_waking(
    make_settings: Callable[..., Settings], fake_clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relay.api.openai.STREAM_HEADSTART_SECONDS", 0.05)
    monkeypatch.setattr("relay.service.WAKE_COMMENT_SECONDS", 0.05)
    async with serve_replica(make_settings(), fake_clients) as (url, _):
        pub = await sleepy(url)
        pub.release.clear()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            body = {
                "model": "sleepy",
                "messages": [{"role": "user", "content": "a b"}],
                "stream": True,
            }
            async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200 and "x-relay-wake-ms" in resp.headers
                lines = resp.aiter_lines()
                first = await anext(lines)
                assert first.startswith(": waking sleepy, ")
                pub.release.set()
                rest = [line async for line in lines if line]
        assert any(line.startswith(": woke sleepy in ") for line in rest)
        data = [line for line in rest if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) == 3
        await pub.aclose()


async def test_stream_through_sdk_after_a_short_wake(replica: tuple[str, Relay]) -> None:
    url, _ = replica
    pub = await sleepy(url)
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    stream = await client.chat.completions.create(
        model="sleepy", messages=[{"role": "user", "content": "x y"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "x y "
    await client.close()
    await pub.aclose()


async def test_held_requests_are_bounded_with_429(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> None:
    async with serve_replica(make_settings(wake_max_waiters=2), fake_clients) as (url, relay):
        pub = await sleepy(url)
        pub.release.clear()
        held = [asyncio.create_task(ask(url)) for _ in range(2)]
        async with asyncio.timeout(5):  # both held requests have taken their slot
            while await relay.store.redis.get(relay.keys.wake_waiters("sleepy")) != b"2":
                await asyncio.sleep(0.01)
        r = await ask(url)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "wake_queue_full" and "retry-after" in r.headers
        pub.release.set()
        assert [x.status_code for x in await asyncio.gather(*held)] == [200, 200]
        await pub.aclose()
