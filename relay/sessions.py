"""Publisher control channels held by this replica.

A channel is the server side of one publisher's SSE connection: a list of
ready-made SSE frames that its response writes out. Frames are built
once, as bytes, when the task is routed; nothing re-encodes them here.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import orjson

PING_SECONDS = 15.0
_PING = b": ping\n\n"


def frame(event: str, data: bytes) -> bytes:
    """One SSE event. ``data`` must be a single line (compact JSON is)."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


class Channel:
    """Frames waiting for the publisher. The response writing them
    (``relay.api.control.ChannelResponse``) sets ``wake`` to hear about new
    ones: no queue, no task parked on one per idle channel."""

    def __init__(self, session_id: str, principal: str) -> None:
        self.session_id = session_id
        self.principal = principal
        self.channel_id = secrets.token_hex(8)
        self.taken_over = False  # closed without deactivating: a resume, or a drain
        self.close_reason = ""
        self.closed = False
        self.wake: Callable[[], None] | None = None
        self._frames: list[bytes] = []

    def send(self, event: str, data: bytes) -> None:
        if not self.closed:
            self._frames.append(frame(event, data))
            if self.wake is not None:
                self.wake()

    def send_json(self, event: str, obj: object) -> None:
        self.send(event, orjson.dumps(obj))

    def ping(self) -> None:
        """Queue a keep-alive comment (the channel has been quiet)."""
        if not self.closed:
            self._frames.append(_PING)
            if self.wake is not None:
                self.wake()

    def close(self, *, taken_over: bool = False, reason: str = "") -> None:
        """End the stream after what is queued. ``taken_over``: the session
        lives on elsewhere, keep its rows."""
        if not self.closed:
            self.taken_over = taken_over
            self.close_reason = reason
            self.closed = True
            if self.wake is not None:
                self.wake()

    @property
    def pending(self) -> bool:
        return bool(self._frames)

    def take(self) -> bytes:
        """Everything queued, as one write (b"" when nothing is)."""
        if not self._frames:
            return b""
        frames, self._frames = self._frames, []
        return frames[0] if len(frames) == 1 else b"".join(frames)


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
