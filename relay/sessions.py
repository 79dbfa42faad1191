"""Publisher control channels held by this replica.

A channel is the server side of one publisher's SSE connection: a queue of
ready-made SSE frames that the response generator drains. Frames are built
once, as bytes, when the task is routed; nothing re-encodes them here.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import orjson

PING_SECONDS = 15.0
_PING = b": ping\n\n"


def frame(event: str, data: bytes) -> bytes:
    """One SSE event. ``data`` must be a single line (compact JSON is)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class Channel:
    def __init__(self, session_id: str, principal: str) -> None:
        self.session_id = session_id
        self.principal = principal
        self.channel_id = secrets.token_hex(8)
        self.taken_over = False  # closed without deactivating: a resume, or a drain
        self.close_reason = ""
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    def send(self, event: str, data: bytes) -> None:
        if not self.closed:
            self._queue.put_nowait(frame(event, data))

    def send_json(self, event: str, obj: object) -> None:
        self.send(event, orjson.dumps(obj))

    def close(self, *, taken_over: bool = False, reason: str = "") -> None:
        """End the stream after what is queued; the generator then returns.
        ``taken_over``: the session lives on elsewhere, keep its rows."""
        if not self.closed:
            self.taken_over = taken_over
            self.close_reason = reason
            self.closed = True
            self._queue.put_nowait(None)

    async def frames(self, ping_seconds: float = PING_SECONDS) -> AsyncIterator[bytes]:
        """The SSE body: queued frames, batched when several are ready, and a
        keep-alive comment whenever the channel has been quiet for a while."""
        queue = self._queue
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for adds a
                # task per wait, and every idle channel waits all the time.
                async with asyncio.timeout(ping_seconds):
                    item = await queue.get()
            except TimeoutError:
                yield _PING
                continue
            if item is None:
                return
            if queue.empty():
                yield item
                continue
            parts = [item]
            end = False
            while not queue.empty():
                nxt = queue.get_nowait()
                if nxt is None:
                    end = True
                    break
                parts.append(nxt)
            yield b"".join(parts)
            if end:
                return


class Sessions:
    """Session id -> the channel this replica holds for it."""

    def __init__(self) -> None:
        self._channels: dict[str, Channel] = {}

    def __len__(self) -> int:
        return len(self._channels)

    def get(self, session_id: str) -> Channel | None:
        return self._channels.get(session_id)

    def add(self, channel: Channel) -> Channel | None:
        """Hold ``channel``; return the one it replaces on this replica, if any."""
        old = self._channels.get(channel.session_id)
        self._channels[channel.session_id] = channel
        return old

    def discard(self, channel: Channel) -> None:
        if self._channels.get(channel.session_id) is channel:
            del self._channels[channel.session_id]

    def find(self, session_id: str, channel_id: str) -> Channel | None:
        ch = self._channels.get(session_id)
        return ch if ch is not None and ch.channel_id == channel_id else None

    def all(self) -> list[Channel]:
        return list(self._channels.values())
