"""The inbox reader on its raw connection (``BlockingLane``): it is used on a
real Redis, and losing it mid-stream falls back to redis-py without losing
or repeating a message."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from relay.bus import Inbox
from tests.support.procs import RedisProcess


async def _until(predicate: object, what: str, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_reads_on_the_lane_and_falls_back_without_loss(
    redis_proc: RedisProcess, prefix: str
) -> None:
    got: list[bytes] = []
    redis = Redis.from_url(redis_proc.url)
    blocking = Redis.from_url(redis_proc.url, socket_timeout=3.0)
    stream = f"{prefix}:inbox"
    inbox = Inbox(blocking, stream, lambda m: got.append(m[b"n"]), block_seconds=0.3)
    try:
        await inbox.start()
        await _until(lambda: inbox._lane._proto is not None, "the lane connected")
        for i in range(20):
            await redis.xadd(stream, {"n": str(i)})
        await _until(lambda: len(got) == 20, "20 messages")
        lane_clients = [c for c in await redis.client_list() if "xread" in c["cmd"]]
        assert lane_clients, "nothing reads the inbox"
        # Kill every reader connection (the lane's among them) while messages flow.
        for i in range(20, 40):
            await redis.xadd(stream, {"n": str(i)})
            if i == 25:
                await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await _until(lambda: len(got) == 40, "40 messages")
        # The lane comes back after its retry pause and carries the reads again.
        await _until(lambda: inbox._lane._proto is not None, "the lane reconnected")
        await redis.xadd(stream, {"n": "last"})
        await _until(lambda: got[-1:] == [b"last"], "one more message")
        # A message read twice (a reader resuming from an older id) would
        # stand before "last": none lost, none repeated, in order.
        assert got == [str(i).encode() for i in range(40)] + [b"last"]
        assert inbox.healthy
    finally:
        await inbox.stop()
        await blocking.aclose()
        await redis.aclose()
