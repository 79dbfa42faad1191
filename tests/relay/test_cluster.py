"""Three real replica processes on one real redis-server: the publisher's
channel on A, consumers on B, result posts through C, so every request
crosses replicas through the inbox streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest
from redis.asyncio import Redis

from tests.support.procs import RedisProcess, ReplicaProcess
from tests.support.scripted import ScriptedPublisher, WakingPublisher, echo_handler


class Cluster:
    def __init__(self, redis: RedisProcess) -> None:
        self.prefix = f"c{uuid.uuid4().hex[:8]}"
        self.redis_url = redis.url
        self.replicas = [
            ReplicaProcess(redis.url, prefix=self.prefix, replica_id=f"r{i}-{self.prefix}")
            for i in range(3)
        ]

    @property
    def a(self) -> ReplicaProcess:
        return self.replicas[0]

    @property
    def b(self) -> ReplicaProcess:
        return self.replicas[1]

    @property
    def c(self) -> ReplicaProcess:
        return self.replicas[2]

    def logs(self) -> str:
        return "\n".join(f"--- {r.replica_id}\n{r.log()[-3000:]}" for r in self.replicas)

    def stop(self) -> None:
        for r in self.replicas:
            r.terminate(10)


@pytest.fixture(scope="module")
def cluster(redis_proc: RedisProcess) -> Iterator[Cluster]:
    c = Cluster(redis_proc)
    yield c
    c.stop()


@pytest.fixture(autouse=True)
def show_logs_on_failure(request: pytest.FixtureRequest, cluster: Cluster) -> Iterator[None]:
    """A failing cluster test prints what the replicas logged."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(cluster.logs())


@pytest.fixture
async def consumer(cluster: Cluster) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=cluster.b.url + "/v1", api_key="unused", max_retries=0, timeout=20
    )
    yield client
    await client.close()


async def published(cluster: Cluster, name: str, handler: Any = echo_handler) -> ScriptedPublisher:
    pub = ScriptedPublisher(cluster.a.url, post_url=cluster.c.url, handler=handler)
    await pub.connect()
    r = await pub.register({"name": name, "type": "openai", "model": "m"})
    assert r.status_code == 200, r.text
    return pub


async def test_non_streaming_across_replicas(
    cluster: Cluster, consumer: openai.AsyncOpenAI
) -> None:
    pub = await published(cluster, "x-plain")
    reply = await consumer.chat.completions.create(
        model="x-plain", messages=[{"role": "user", "content": "across"}]
    )
    assert reply.choices[0].message.content == "echo: across"
    await pub.aclose()


async def test_streaming_across_replicas(cluster: Cluster, consumer: openai.AsyncOpenAI) -> None:
    pub = await published(cluster, "x-stream")
    stream = await consumer.chat.completions.create(
        model="x-stream", messages=[{"role": "user", "content": "a b c d"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "a b c d "
    await pub.aclose()


async def test_200_concurrent_streams_every_chunk_once_in_order(cluster: Cluster) -> None:
    pub = await published(cluster, "x-many")
    n_chunks = 40
    clients = [
        openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for r in (cluster.b, cluster.c)
    ]

    async def one(i: int) -> list[str]:
        stream = await clients[i % 2].chat.completions.create(
            model="x-many",
            messages=[{"role": "user", "content": str(i)}],
            stream=True,
            extra_body={"x_chunks": n_chunks},
        )
        return [c.choices[0].delta.content or "" async for c in stream]

    results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(200))), 90)
    expected = [str(k) for k in range(n_chunks)]
    bad = [i for i, got in enumerate(results) if got != expected]
    print(f"200 streams x {n_chunks} chunks: {200 - len(bad)} complete and in order")
    assert not bad, f"streams {bad[:5]} differ, e.g. {results[bad[0]][:10]}"
    for c in clients:
        await c.close()
    await pub.aclose()


async def test_publisher_disconnect_fails_in_flight_consumers_within_1s(
    cluster: Cluster, consumer: openai.AsyncOpenAI
) -> None:
    pub = await published(cluster, "x-drop", handler=None)
    calls = [
        asyncio.create_task(consumer.chat.completions.create(model="x-drop", messages=[]))
        for _ in range(5)
    ]
    for _ in calls:
        await pub.next_event("task")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await pub.disconnect()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 3)
    elapsed = loop.time() - start
    assert elapsed < 1.0, f"consumers failed after {elapsed:.2f} s"
    assert all(isinstance(r, openai.APIStatusError) and r.status_code == 502 for r in results), (
        results
    )
    # Offline now: the next request is refused at once, nothing queued.
    with pytest.raises(openai.APIStatusError) as err:
        await asyncio.wait_for(consumer.chat.completions.create(model="x-drop", messages=[]), 2)
    assert err.value.status_code == 503
    await pub.aclose()


async def test_takeover_from_another_replica_keeps_rows_active(
    cluster: Cluster, consumer: openai.AsyncOpenAI
) -> None:
    pub = await published(cluster, "x-move")
    moved = ScriptedPublisher(cluster.b.url, post_url=cluster.c.url, handler=echo_handler)
    await moved.connect(resume=pub.session_id)
    await asyncio.wait_for(pub.closed.wait(), 5)  # replica A closed the old channel
    models = {m.id: m.model_extra for m in (await consumer.models.list()).data}
    assert models["x-move"] and models["x-move"]["status"] == "active"
    reply = await consumer.chat.completions.create(
        model="x-move", messages=[{"role": "user", "content": "moved"}]
    )
    assert reply.choices[0].message.content == "echo: moved"
    await pub.aclose()
    await moved.aclose()


async def test_models_are_the_same_on_every_replica(cluster: Cluster) -> None:
    pub = await published(cluster, "x-everywhere")
    seen = []
    for r in cluster.replicas:
        client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
        seen.append(sorted(m.id for m in (await client.models.list()).data))
        await client.close()
    assert seen[0] == seen[1] == seen[2] and "x-everywhere" in seen[0]
    await pub.aclose()


SLEEPY = {"type": "openai", "model": "m", "initialStatus": "hibernating", "wakeMaxWaitSeconds": 10}


async def sleepy_on_a(cluster: Cluster, name: str, **kw: Any) -> WakingPublisher:
    pub = WakingPublisher(cluster.a.url, post_url=cluster.c.url, **kw)
    await pub.connect()
    r = await pub.register({"name": name, **SLEEPY})
    assert r.status_code == 200, r.text
    return pub


async def held(cluster: Cluster, name: str, n: int) -> None:
    """Wait until ``n`` requests are held for the wake of ``name``, cluster-wide."""
    redis = Redis.from_url(cluster.redis_url)
    try:
        async with asyncio.timeout(20):
            while int(await redis.get(f"{{{cluster.prefix}}}:wake:{name}:waiters") or 0) < n:
                await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


async def burst(cluster: Cluster, name: str, n: int) -> list[httpx.Response]:
    clients = [httpx.AsyncClient(base_url=r.url, timeout=30) for r in cluster.replicas]
    body = {"model": name, "messages": [{"role": "user", "content": "wake"}]}
    try:
        return await asyncio.gather(
            *(clients[i % 3].post("/v1/chat/completions", json=body) for i in range(n))
        )
    finally:
        for c in clients:
            await c.aclose()


async def test_100_concurrent_infers_over_three_replicas_make_one_wake(cluster: Cluster) -> None:
    pub = await sleepy_on_a(cluster, "x-sleepy")
    pub.release.clear()
    calls = asyncio.create_task(burst(cluster, "x-sleepy", 100))
    await asyncio.wait_for(pub.wake_seen.wait(), 10)
    await held(cluster, "x-sleepy", 100)  # every request waits for the one wake
    pub.release.set()
    replies = await asyncio.wait_for(calls, 30)
    codes = [r.status_code for r in replies]
    print(
        f"100 infers over 3 replicas: {codes.count(200)} ok, wake tasks: {pub.kinds.count('wake')}"
    )
    assert codes == [200] * 100
    assert pub.kinds.count("wake") == 1 and pub.kinds.count("infer") == 100
    assert all("x-relay-wake-ms" in r.headers for r in replies)
    await pub.aclose()


async def test_failed_wake_fails_everywhere_then_next_burst_tries_one_new_wake(
    cluster: Cluster,
) -> None:
    pub = await sleepy_on_a(cluster, "x-grumpy", wake_error="wake_up answered 500")
    pub.release.clear()
    calls = asyncio.create_task(burst(cluster, "x-grumpy", 30))
    await asyncio.wait_for(pub.wake_seen.wait(), 10)
    await held(cluster, "x-grumpy", 30)  # a request arriving after the failure would try again
    pub.release.set()
    replies = await asyncio.wait_for(calls, 30)
    assert all(r.status_code == 503 and r.json()["error"]["code"] == "wake_failed" for r in replies)
    assert pub.kinds == ["wake"]
    pub.wake_error = None
    pub.wake_seen.clear()
    replies = await asyncio.wait_for(burst(cluster, "x-grumpy", 30), 30)
    assert [r.status_code for r in replies] == [200] * 30
    assert pub.kinds.count("wake") == 2
    await pub.aclose()


async def test_publisher_dying_during_wake_fails_waiters_on_every_replica(cluster: Cluster) -> None:
    pub = await sleepy_on_a(cluster, "x-dies")
    pub.release.clear()
    calls = asyncio.create_task(burst(cluster, "x-dies", 30))
    await asyncio.wait_for(pub.wake_seen.wait(), 10)
    await held(cluster, "x-dies", 30)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await pub.disconnect()
    replies = await asyncio.wait_for(calls, 10)
    elapsed = loop.time() - start
    assert elapsed < 2.0, f"waiters failed after {elapsed:.2f} s"
    assert all(r.status_code == 503 and r.json()["error"]["code"] == "wake_failed" for r in replies)
    await pub.aclose()
