"""Chunk batches reach the consumer once and in stream order, whatever order
they arrive in."""

from __future__ import annotations

import orjson

from relay.tasks import Pending


def batch(offset: int | None, *chunks: str) -> bytes:
    body: dict[str, object] = {"chunks": list(chunks)}
    if offset is not None:
        body["offset"] = offset
    return orjson.dumps(body)


def test_in_order_batches_pass_through() -> None:
    p = Pending("t", "m", True)
    assert p.take_chunks(batch(0, "a", "b")) == ["a", "b"]
    assert p.take_chunks(batch(2, "c")) == ["c"]


def test_a_batch_that_overtook_waits_for_the_gap() -> None:
    p = Pending("t", "m", True)
    assert p.take_chunks(batch(2, "c", "d")) == []
    assert p.take_chunks(batch(5, "f")) == []
    assert p.take_chunks(batch(0, "a", "b")) == ["a", "b", "c", "d"]
    assert p.take_chunks(batch(4, "e")) == ["e", "f"]
    assert p.take_rest() == []


def test_resent_and_overlapping_batches_are_delivered_once() -> None:
    p = Pending("t", "m", True)
    assert p.take_chunks(batch(0, "a", "b")) == ["a", "b"]
    assert p.take_chunks(batch(0, "a", "b")) == []
    assert p.take_chunks(batch(1, "b", "c")) == ["c"]
    assert p.take_chunks(batch(4, "e")) == []
    assert p.take_chunks(batch(3, "d", "e")) == ["d", "e"]
    assert p.take_rest() == []


def test_batches_without_offsets_keep_arrival_order() -> None:
    p = Pending("t", "m", True)
    assert p.take_chunks(batch(None, "a")) == ["a"]
    assert p.take_chunks(batch(None, "b")) == ["b"]


def test_a_gap_that_never_fills_is_flushed_in_order_at_the_end() -> None:
    p = Pending("t", "m", True)
    assert p.take_chunks(batch(0, "a")) == ["a"]
    assert p.take_chunks(batch(3, "d")) == []
    assert p.take_chunks(batch(5, "f")) == []
    assert p.take_rest() == ["d", "f"]
