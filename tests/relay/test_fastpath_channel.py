"""The control channel's own SSE response (``relay.api.control``): frames
in order, keep-alives when quiet, the end after a close, and ``on_end`` once
on a disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from relay.api.control import ChannelResponse
from relay.sessions import Channel


async def test_frames_pings_and_close() -> None:
    channel = Channel("s1", "alice")
    sent: list[MutableMapping[str, Any]] = []
    ended: list[bool] = []
    done = asyncio.Event()

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message.get("more_body") is False:
            done.set()

    async def receive() -> MutableMapping[str, Any]:
        await done.wait()  # as uvicorn: a completed response reads as a disconnect
        return {"type": "http.disconnect"}

    channel.send("hello", b"{}")  # queued before the response starts
    response = ChannelResponse(channel, lambda: ended.append(True), ping_seconds=0.1)
    task = asyncio.create_task(response({"type": "http"}, receive, send))
    await asyncio.sleep(0.25)
    channel.send("task", b'{"a":1}')
    channel.send("task", b'{"a":2}')
    channel.close()
    await asyncio.wait_for(task, 2)
    bodies = [m["body"] for m in sent[1:]]
    assert (
        sent[0]["status"] == 200
        and (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    )
    assert bodies[0] == b"event: hello\ndata: {}\n\n"
    assert b": ping\n\n" in bodies[1:-2]
    assert bodies[-2:] == [b'event: task\ndata: {"a":1}\n\nevent: task\ndata: {"a":2}\n\n', b""]
    assert ended == [True]


async def test_a_disconnect_ends_it_at_once() -> None:
    channel = Channel("s2", "alice")
    gone = asyncio.Event()
    ended: list[bool] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    async def receive() -> MutableMapping[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(
        ChannelResponse(channel, lambda: ended.append(True))({"type": "http"}, receive, send)
    )
    await asyncio.sleep(0.05)
    gone.set()
    await asyncio.wait_for(task, 1)
    assert ended == [True] and channel.wake is None
