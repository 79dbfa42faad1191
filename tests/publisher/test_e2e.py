"""The real agent against real relays: the openai SDK as consumer, the toy
backend as model server. In-process replicas on fakeredis for speed, and a
replica process restart for the 'relay goes away' case."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
import uvicorn

from relay.config import Settings
from relay.connections import Clients
from relay.publisher import Agent, PublisherConfig
from relay.service import Relay
from relay.toy_backend import create_toy_backend
from tests.support.inproc import serve_replica
from tests.support.procs import RedisProcess, ReplicaProcess, free_port


@contextlib.asynccontextmanager
async def toy_backend(**kw: Any) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_toy_backend(**kw),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    task = asyncio.create_task(agent.run())
    try:
        await asyncio.wait_for(agent.registered.wait(), 10)
        yield agent
    finally:
        await asyncio.wait_for(agent.stop(), 10)
        await asyncio.wait_for(task, 10)


def agent_for(relay_url: str, providers: list[dict[str, Any]], **kw: Any) -> Agent:
    return Agent(
        PublisherConfig.build(relay_url, "unused-token", providers),
        backoff_base=0.05,
        backoff_cap=0.5,
        **kw,
    )


@pytest.fixture
async def relay(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> AsyncIterator[tuple[str, Relay]]:
    async with serve_replica(make_settings(task_timeout_seconds=10), fake_clients) as r:
        yield r


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=15)


async def test_published_backend_answers_through_openai_sdk_both_modes(
    relay: tuple[str, Relay],
) -> None:
    url, _ = relay
    async with toy_backend() as backend:
        providers = [{"name": "toy", "url": backend, "model": "toy-model"}]
        async with running(agent_for(url, providers)):
            client = sdk(url)
            reply = await client.chat.completions.create(
                model="toy", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "echo: hi"
            assert reply.model == "toy-model"  # the backend saw its own model id
            stream = await client.chat.completions.create(
                model="toy",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                extra_body={"x_chunks": 50},
            )
            parts = [c.choices[0].delta.content async for c in stream if c.choices]
            assert parts[0] == "echo: hi" and parts[1:] == [f" {i}" for i in range(1, 50)]
            emb = await client.embeddings.create(model="toy", input="abc")
            assert len(emb.data[0].embedding) > 0
            await client.close()


async def test_backend_down_is_502_naming_the_provider_and_others_keep_serving(
    relay: tuple[str, Relay],
) -> None:
    url, _ = relay
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with toy_backend() as backend:
        providers = [
            {"name": "gone", "url": dead, "model": "m"},
            {"name": "alive", "url": backend, "model": "toy-model"},
        ]
        async with running(agent_for(url, providers)):
            client = sdk(url)
            with pytest.raises(openai.APIStatusError) as err:
                await client.chat.completions.create(
                    model="gone", messages=[{"role": "user", "content": "x"}]
                )
            assert err.value.status_code == 502 and "gone" in err.value.message
            reply = await client.chat.completions.create(
                model="alive", messages=[{"role": "user", "content": "ok"}]
            )
            assert reply.choices[0].message.content == "echo: ok"
            await client.close()


async def test_backend_http_error_passes_through(relay: tuple[str, Relay]) -> None:
    url, _ = relay
    async with toy_backend() as backend:
        async with running(agent_for(url, [{"name": "toy", "url": backend, "model": "toy-model"}])):
            client = sdk(url)
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(
                    model="toy", messages=[], extra_body={"x_status": 400}
                )
            await client.close()


async def test_agent_survives_a_replica_restart(redis_proc: RedisProcess, prefix: str) -> None:
    port = free_port()
    replica = ReplicaProcess(redis_proc.url, prefix=prefix, replica_id=f"{prefix}-1", port=port)
    try:
        async with toy_backend() as backend:
            agent = agent_for(replica.url, [{"name": "toy", "url": backend, "model": "toy-model"}])
            async with running(agent):
                client = sdk(replica.url)
                assert (
                    await client.chat.completions.create(
                        model="toy", messages=[{"role": "user", "content": "1"}]
                    )
                ).choices
                first_connects = agent.connects
                replica.kill()  # the relay goes away without a word
                replica = ReplicaProcess(
                    redis_proc.url, prefix=prefix, replica_id=f"{prefix}-2", port=port
                )
                async with asyncio.timeout(15):  # back, resumed, rows active again
                    while agent.connects == first_connects or not agent.registered.is_set():
                        await asyncio.sleep(0.05)
                    while True:
                        models = {
                            m.id: (m.model_extra or {}).get("status")
                            for m in (await client.models.list()).data
                        }
                        if models.get("toy") == "active":
                            break
                        await asyncio.sleep(0.05)
                reply = await client.chat.completions.create(
                    model="toy", messages=[{"role": "user", "content": "again"}]
                )
                assert reply.choices[0].message.content == "echo: again"
                await client.close()
    finally:
        replica.kill()


async def test_hibernating_backend_is_woken_by_the_first_request(relay: tuple[str, Relay]) -> None:
    url, relay_obj = relay
    async with toy_backend(asleep=True) as backend:
        providers = [
            {
                "name": "vllm",
                "url": backend,
                "model": "toy-model",
                "wake": {"type": "vllm", "maxWaitSeconds": 5},
            }
        ]
        async with running(agent_for(url, providers, wake_poll_interval=0.05)):
            assert (await relay_obj.store.get_row("vllm") or {})["status"] == "hibernating"
            client = sdk(url)
            raw = await client.chat.completions.with_raw_response.create(
                model="vllm", messages=[{"role": "user", "content": "wake up"}]
            )
            assert raw.parse().choices[0].message.content == "echo: wake up"
            assert int(raw.headers["x-relay-wake-ms"]) >= 0
            assert (await relay_obj.store.get_row("vllm") or {})["status"] == "active"
            await client.close()
