"""The SSE decoder shared by the control channel and backend streams."""

from __future__ import annotations

from relay.publisher.sse import SSEDecoder, SSEEvent


def test_events_split_anywhere_are_reassembled() -> None:
    raw = (
        b': ping\n\nevent: session\ndata: {"sessionId": "abc"}\n\n'
        b'event: task\r\ndata: {"x": "\xc3\xa9"}\r\n\r\ndata: one\ndata: two\n\n'
    )
    for size in (1, 2, 7, len(raw)):
        decoder = SSEDecoder()
        events: list[SSEEvent] = []
        for i in range(0, len(raw), size):
            events.extend(decoder.feed(raw[i : i + size]))
        assert events == [
            SSEEvent("session", '{"sessionId": "abc"}'),
            SSEEvent("task", '{"x": "\u00e9"}'),
            SSEEvent("message", "one\ntwo"),
        ]


def test_long_lines_have_no_limit() -> None:
    payload = "x" * 1_000_000
    (event,) = SSEDecoder().feed(b"data: " + payload.encode() + b"\n\n")
    assert event.data == payload
