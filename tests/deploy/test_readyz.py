"""/readyz follows the inbox reader: unready while Redis is gone or the
reader is stalled, ready again once it reads; and it answers fast meanwhile
(a probe must not wait out an outage)."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.bus import Inbox, Message
from relay.connections import connect
from tests.support.procs import RedisProcess, ReplicaProcess, redis_server_binary, wait_until

pytestmark = pytest.mark.skipif(redis_server_binary() is None, reason="redis-server not installed")


def readyz(url: str) -> tuple[int, float]:
    started = time.monotonic()
    status = httpx.get(url + "/readyz", timeout=5).status_code
    return status, time.monotonic() - started


def test_readyz_is_503_while_redis_is_down_and_200_once_it_is_back() -> None:
    redis = RedisProcess()
    replica = None
    try:
        replica = ReplicaProcess(redis.url, prefix=f"rz{uuid.uuid4().hex[:6]}", replica_id="rz")
        assert readyz(replica.url)[0] == 200
        port = redis.port
        redis.stop()
        wait_until(lambda: readyz(replica.url)[0] == 503, 5, "/readyz 503 without Redis")
        status, took = readyz(replica.url)
        assert status == 503 and took < 1.5, f"/readyz took {took:.2f} s"
        assert httpx.get(replica.url + "/healthz").status_code == 200  # alive: no restart
        redis = RedisProcess(port=port)
        wait_until(lambda: readyz(replica.url)[0] == 200, 10, "/readyz 200 after Redis returned")
        assert "inbox reader reconnected" in replica.log()
    finally:
        if replica is not None:
            replica.kill()
        redis.stop()


async def test_a_stalled_reader_is_unhealthy_until_it_reads_again() -> None:
    """CLIENT PAUSE holds the reader's XREAD without an error: only the stall
    check can tell, after two block periods."""
    redis = RedisProcess()
    clients = connect(redis.url, block_seconds=0.2)
    admin = Redis.from_url(redis.url)
    got: list[Message] = []
    inbox = Inbox(clients.blocking, "stall-inbox", got.append, block_seconds=0.2)
    try:
        await inbox.start()
        assert inbox.healthy
        await admin.execute_command("CLIENT", "PAUSE", "2500", "ALL")
        async with asyncio.timeout(2.4):
            while inbox.healthy:
                await asyncio.sleep(0.05)
        async with asyncio.timeout(5):
            while not inbox.healthy:
                await asyncio.sleep(0.05)
        await admin.xadd("stall-inbox", {"k": "x"})
        async with asyncio.timeout(2):
            while not got:
                await asyncio.sleep(0.02)
    finally:
        await inbox.stop()
        await clients.aclose()
        await admin.aclose()
        redis.stop()


async def test_commands_wait_for_redis_within_the_budget_then_fail_cleanly() -> None:
    """A restart shorter than the budget is a pause; a longer outage is an
    error after the budget (the API turns it into 503 + Retry-After)."""
    redis = RedisProcess()
    port = redis.port
    clients = connect(redis.url, retry_budget=3.0)
    try:
        await clients.commands.set("k", "v")
        redis.stop()
        loop = asyncio.get_running_loop()
        # The scenario is an outage of a known length (Redis down for 1 s,
        # then back on the same port), not a wait for something to happen.
        back = loop.run_in_executor(None, lambda: (time.sleep(1.0), RedisProcess(port=port))[1])
        started = time.monotonic()
        assert await clients.commands.ping()  # waited for the restart
        waited = time.monotonic() - started
        redis = await back
        assert 0.5 < waited < 3.0, waited
        redis.stop()
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await clients.commands.get("k")
        assert 2.5 < time.monotonic() - started < 5.0
    finally:
        await clients.aclose()
        redis.stop()
