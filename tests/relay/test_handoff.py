"""A session moves to another replica while tasks for it are on their way to
the old one: they follow it, whether the old replica lives or died."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import pytest

from relay.config import Settings
from relay.connections import Clients
from relay.service import Relay
from tests.support.inproc import serve_replica
from tests.support.scripted import ScriptedPublisher, echo_handler

LLAMA = {"name": "llama", "type": "openai", "model": "m"}
Pair = tuple[tuple[str, Relay], tuple[str, Relay]]


@pytest.fixture
async def pair(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> AsyncIterator[Pair]:
    """Replicas A and B on one (fake) Redis."""
    server = fake_clients.commands.connection_pool.connection_kwargs["server"]
    b_clients = Clients(
        fakeredis.FakeAsyncRedis(server=server), fakeredis.FakeAsyncRedis(server=server)
    )
    async with (
        serve_replica(make_settings(redis_prefix="p", replica_id="ra"), fake_clients) as a,
        serve_replica(make_settings(redis_prefix="p", replica_id="rb"), b_clients) as b,
    ):
        yield a, b


def hold_inbox(relay: Relay) -> tuple[list[Any], Callable[[], None]]:
    """Make a replica's inbox reader keep what it reads; the returned
    function delivers it and restores the reader."""
    held: list[Any] = []
    dispatch = relay.inbox._dispatch
    relay.inbox._dispatch = held.append

    def release() -> None:
        relay.inbox._dispatch = dispatch
        for message in held:
            dispatch(message)

    return held, release


async def until(predicate: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_a_task_reaching_the_old_replica_after_a_takeover_is_forwarded(pair: Pair) -> None:
    (url_a, relay_a), (url_b, _) = pair
    old = ScriptedPublisher(url_a)
    await old.connect()
    await old.register(LLAMA)
    held, release = hold_inbox(relay_a)
    async with httpx.AsyncClient(base_url=url_b, timeout=10) as http:
        body = {"model": "llama", "messages": [{"role": "user", "content": "follow"}]}
        call = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        await until(lambda: len(held) == 1, "the task in A's inbox")
        new = ScriptedPublisher(url_b, handler=echo_handler)  # the publisher moved to B
        await new.connect(resume=old.session_id)
        await old.disconnect()  # its old connection to A is gone, and A saw it
        await until(lambda: relay_a.sessions.get(old.session_id) is None, "A dropping the channel")
        release()  # A reads the task only now: the session is on B
        reply = await asyncio.wait_for(call, 5)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "echo: follow"
    await old.aclose()
    await new.aclose()


async def test_tasks_stranded_in_a_dead_replicas_inbox_are_sent_again(pair: Pair) -> None:
    (url_a, relay_a), (url_b, _) = pair
    old = ScriptedPublisher(url_a)
    await old.connect()
    await old.register(LLAMA)
    held, _ = hold_inbox(relay_a)  # A reads the task but never delivers it...
    async with httpx.AsyncClient(base_url=url_b, timeout=10) as http:
        body = {"model": "llama", "messages": [{"role": "user", "content": "again"}]}
        call = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        await until(lambda: len(held) == 1, "the task in A's inbox")
        for loop in relay_a._loops:  # ...and dies: its liveness lapses
            loop.cancel()
        await relay_a.store.redis.delete(relay_a.keys.replica("ra"))
        new = ScriptedPublisher(url_b, handler=echo_handler)
        await new.connect(resume=old.session_id)
        reply = await asyncio.wait_for(call, 5)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "echo: again"
    await old.aclose()
    await new.aclose()
