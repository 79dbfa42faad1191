"""The inbox reader: order, resumption after errors, trimming, health."""

from __future__ import annotations

import asyncio

import pytest

from relay.bus import Inbox, Message
from relay.connections import Clients


async def test_delivers_in_order_and_trims_what_it_read(
    fake_clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relay.bus.TRIM_EVERY_SECONDS", 0.0)
    got: list[bytes] = []
    done = asyncio.Event()

    def dispatch(msg: Message) -> None:
        got.append(msg[b"n"])
        if len(got) == 50:
            done.set()

    redis = fake_clients.commands
    inbox = Inbox(fake_clients.blocking, "inbox", dispatch, block_seconds=0.2)
    await redis.xadd("inbox", {"n": "old"})  # before the reader started: not for it
    await inbox.start()
    for i in range(50):
        await redis.xadd("inbox", {"n": str(i)})
    await asyncio.wait_for(done.wait(), 5)
    assert got == [str(i).encode() for i in range(50)]
    async with asyncio.timeout(5):
        while await redis.xlen("inbox") > 1:  # the last read entry stays as the trim mark
            await asyncio.sleep(0.01)
    assert inbox.healthy
    await inbox.stop()
    assert not inbox.healthy


async def test_a_failing_handler_does_not_stop_delivery(fake_clients: Clients) -> None:
    got: list[bytes] = []
    done = asyncio.Event()

    def dispatch(msg: Message) -> None:
        if msg[b"n"] == b"bad":
            raise ValueError("boom")
        got.append(msg[b"n"])
        done.set()

    inbox = Inbox(fake_clients.blocking, "inbox", dispatch, block_seconds=0.2)
    await inbox.start()
    await fake_clients.commands.xadd("inbox", {"n": "bad"})
    await fake_clients.commands.xadd("inbox", {"n": "good"})
    await asyncio.wait_for(done.wait(), 5)
    assert got == [b"good"]
    await inbox.stop()
