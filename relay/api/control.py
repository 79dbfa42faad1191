"""The publisher control channel's SSE response, lighter than Starlette's.

``StreamingResponse`` runs a task group per response: the request's task
listens for the disconnect while a second task drains an async generator
parked on a queue, under an ``asyncio.timeout`` for the keep-alive. With
thousands of idle publishers that is most of a channel's memory. Here the
request's own task is the only one that lives as long as the channel: it
waits on ``receive()`` for the disconnect (so it is seen at once), while
frames are written by a short-lived task started when some are queued, and
keep-alives come from one timer handle. The wire format is unchanged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.sessions import PING_SECONDS, Channel

log = logging.getLogger("relay.api")


class ChannelResponse(Response):
    """Stream ``channel``'s frames until it closes or the client goes;
    ``on_end`` runs once, either way (the channel's unbinding)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        channel: Channel,
        on_end: Callable[[], None],
        headers: Mapping[str, str] | None = None,
        ping_seconds: float | None = None,
    ) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers(headers)  # no body: no content-length, as for a stream
        self.channel = channel
        self.on_end = on_end
        self.ping_seconds = PING_SECONDS if ping_seconds is None else ping_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        channel = self.channel
        loop = asyncio.get_running_loop()
        writer: asyncio.Task[None] | None = None
        last_write = loop.time()
        ping_seconds = self.ping_seconds
        timer: asyncio.TimerHandle | None = None

        async def write() -> None:
            nonlocal last_write
            try:
                while True:
                    data = channel.take()
                    if data:
                        last_write = loop.time()
                        await send({"type": "http.response.body", "body": data, "more_body": True})
                    elif channel.closed:
                        await send({"type": "http.response.body", "body": b"", "more_body": False})
                        return
                    else:
                        return
            except Exception:  # the connection is gone; receive() reports it
                log.debug("session %s: write failed", channel.session_id, exc_info=True)

        def wake() -> None:
            nonlocal writer
            if writer is None or writer.done():
                writer = loop.create_task(write(), name=f"channel {channel.session_id}")

        def keepalive() -> None:
            nonlocal timer
            quiet = loop.time() - last_write
            if quiet >= ping_seconds * 0.999:
                channel.ping()
                quiet = 0.0
            timer = loop.call_later(ping_seconds - quiet, keepalive)

        timer = loop.call_later(ping_seconds, keepalive)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            channel.wake = wake
            if channel.closed or channel.pending:  # queued before the start
                wake()
            while (await receive())["type"] != "http.disconnect":
                pass  # the request body (none): only the disconnect matters
        finally:
            channel.wake = None
            if timer is not None:
                timer.cancel()
            if writer is not None and not writer.done():
                writer.cancel()
            self.on_end()
