"""One replica, in-process on a real socket, on fakeredis: the HTTP contract,
driven by the official openai SDK on the consumer side and a scripted
publisher on the other."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import fakeredis
import httpx
import openai
import orjson
import pytest

from relay.auth import Authenticator
from relay.config import Settings
from relay.connections import Clients
from relay.service import Relay
from tests.support.inproc import serve_replica
from tests.support.scripted import ScriptedPublisher, chat_chunk, chat_completion, echo_handler

TOKENS = [
    {"name": "alice", "token": "alice-publish-token", "scopes": ["publish"]},
    {"name": "bob", "token": "bob-publish-token", "scopes": ["publish"]},
    {"name": "carol", "token": "carol-infer-token", "scopes": ["infer"]},
    {"name": "root", "token": "root-admin-token", "scopes": ["admin", "infer"]},
]
AUTH = Authenticator.from_config("test", TOKENS)
LLAMA = {"name": "llama", "type": "openai", "model": "llama3"}


@pytest.fixture
async def replica(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> AsyncIterator[tuple[str, Relay]]:
    async with serve_replica(make_settings(task_timeout_seconds=3), fake_clients, auth=AUTH) as r:
        yield r


@pytest.fixture
async def consumer(replica: tuple[str, Relay]) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=replica[0] + "/v1", api_key="carol-infer-token", max_retries=0
    )
    yield client
    await client.close()


async def publisher(url: str, token: str = "alice-publish-token", **kw: Any) -> ScriptedPublisher:
    pub = ScriptedPublisher(url, token, **kw)
    await pub.connect()
    return pub


async def test_non_streaming_round_trip_through_openai_sdk(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    pub = await publisher(replica[0], handler=echo_handler)
    assert (await pub.register(LLAMA)).status_code == 200
    reply = await consumer.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "hello there"}]
    )
    assert reply.choices[0].message.content == "echo: hello there"
    await pub.aclose()


async def test_streaming_round_trip_through_openai_sdk(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    pub = await publisher(replica[0], handler=echo_handler)
    await pub.register(LLAMA)
    stream = await consumer.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    parts = [c.choices[0].delta.content async for c in stream]
    assert "".join(p or "" for p in parts) == "one two three "
    await pub.aclose()


async def test_models_list_shows_status(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    pub = await publisher(replica[0])
    await pub.register(LLAMA)
    models = await consumer.models.list()
    assert [(m.id, m.model_extra and m.model_extra.get("status")) for m in models.data] == [
        ("llama", "active")
    ]
    await pub.aclose()


async def test_auth_errors_in_openai_shape(replica: tuple[str, Relay]) -> None:
    async with httpx.AsyncClient(base_url=replica[0]) as http:
        r = await http.post("/v1/chat/completions", json={"model": "llama"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await http.post(
            "/v1/chat/completions",
            json={"model": "llama"},
            headers={"authorization": "Bearer alice-publish-token"},
        )
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        r = await http.get(
            "/api/v1/providers/session", headers={"authorization": "Bearer wrong-token-x"}
        )
        assert r.status_code == 401
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).status_code == 200


async def test_bad_inputs_get_clear_4xx_and_change_nothing(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    url, relay = replica
    headers = {"authorization": "Bearer carol-infer-token"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        r = await http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = await http.post("/v1/chat/completions", json={"messages": []})
        assert r.status_code == 422 and "model" in r.json()["error"]["message"]
        r = await http.post("/v1/chat/completions", json={"model": "llama", "stream": "yes"})
        assert r.status_code == 422
        big = b'{"model":"llama","x":"' + b"a" * (relay.settings.max_body_bytes + 1) + b'"}'
        r = await http.post("/v1/chat/completions", content=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with pytest.raises(openai.NotFoundError) as err:
        await consumer.chat.completions.create(model="nope", messages=[])
    assert err.value.code == "model_not_found"
    assert len(relay.pending) == 0


async def test_offline_answers_503_at_once_and_queues_nothing(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    url, relay = replica
    pub = await publisher(url)
    await pub.register(LLAMA)
    await pub.disconnect()
    await wait_for_status(relay, "llama", "inactive")
    with pytest.raises(openai.APIStatusError) as err:
        await asyncio.wait_for(consumer.chat.completions.create(model="llama", messages=[]), 2)
    assert err.value.status_code == 503 and err.value.code == "provider_offline"
    assert len(relay.pending) == 0
    assert await relay.store.redis.keys(relay.keys.task("*")) == []
    await pub.aclose()


async def test_publisher_error_is_502_and_upstream_4xx_passes_through(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    async def handler(pub: ScriptedPublisher, task: dict[str, Any]) -> None:
        if task["body"].get("x_mode") == "error":
            await pub.result(
                task["taskId"], {"error": "backend llama at http://x unreachable: refused"}
            )
        else:
            await pub.result(
                task["taskId"],
                {
                    "status": 400,
                    "body": {
                        "error": {
                            "message": "bad prompt",
                            "type": "invalid_request_error",
                            "code": None,
                        }
                    },
                },
            )

    pub = await publisher(replica[0], handler=handler)
    await pub.register(LLAMA)
    with pytest.raises(openai.APIStatusError) as err:
        await consumer.chat.completions.create(
            model="llama", messages=[], extra_body={"x_mode": "error"}
        )
    assert err.value.status_code == 502 and "unreachable" in err.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        await consumer.chat.completions.create(model="llama", messages=[])
    assert "bad prompt" in bad.value.message
    with pytest.raises(
        openai.BadRequestError
    ):  # before any chunk, a stream's error keeps its status
        await consumer.chat.completions.create(model="llama", messages=[], stream=True)
    await pub.aclose()


async def test_task_timeout_is_504_and_task_forgotten(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> None:
    async with serve_replica(make_settings(task_timeout_seconds=0.3), fake_clients, auth=AUTH) as (
        url,
        _relay,
    ):
        pub = await publisher(url)  # never answers
        await pub.register(LLAMA)
        async with httpx.AsyncClient(
            base_url=url, headers={"authorization": "Bearer carol-infer-token"}
        ) as http:
            r = await http.post("/v1/chat/completions", json={"model": "llama", "messages": []})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        task = await pub.next_event("cancel")  # the publisher is told to stop
        late = await pub.result(task["taskId"], {"status": 200, "body": {}})
        assert late.status_code == 404
        await pub.aclose()


async def test_task_posts_need_the_owning_session(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    url, _ = replica
    alice = await publisher(url)
    await alice.register(LLAMA)
    bob = await publisher(url, token="bob-publish-token")
    call = asyncio.create_task(consumer.chat.completions.create(model="llama", messages=[]))
    while True:
        event, task = await asyncio.wait_for(alice.events.get(), 5)
        if event == "task":
            break
    forged = await bob.result(task["taskId"], {"status": 200, "body": {}}, session=alice.session_id)
    assert forged.status_code == 403
    other_session = await bob.result(task["taskId"], {"status": 200, "body": {}})
    assert other_session.status_code == 403
    assert (await alice.result("no-such-task", {"status": 200})).status_code == 404
    ok = await alice.result(task["taskId"], {"status": 200, "body": chat_completion("fine")})
    assert ok.status_code == 200
    assert (await call).choices[0].message.content == "fine"
    await alice.aclose()
    await bob.aclose()


async def test_resume_by_another_principal_is_forbidden(replica: tuple[str, Relay]) -> None:
    alice = await publisher(replica[0])
    bob = ScriptedPublisher(replica[0], "bob-publish-token")
    with pytest.raises(RuntimeError, match="403"):
        await bob.connect(resume=alice.session_id)
    bob.session_id = alice.session_id
    assert (await bob.register(LLAMA)).status_code == 403
    assert (await bob.heartbeat()).status_code == 403
    await alice.aclose()
    await bob.aclose()


async def test_resume_takes_over_without_deactivating(replica: tuple[str, Relay]) -> None:
    url, relay = replica
    first = await publisher(url)
    await first.register(LLAMA)
    second = ScriptedPublisher(url, "alice-publish-token")
    await second.connect(resume=first.session_id)
    await asyncio.wait_for(first.closed.wait(), 5)  # the old channel is closed by the relay
    row = await relay.store.get_row("llama") or {}
    assert row["status"] == "active"
    assert (await second.heartbeat()).json() == {"llms": ["llama"]}
    await first.aclose()
    await second.aclose()


async def test_disconnect_fails_in_flight_consumers_fast(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    pub = await publisher(replica[0])
    await pub.register(LLAMA)
    calls = [
        asyncio.create_task(consumer.chat.completions.create(model="llama", messages=[]))
        for _ in range(3)
    ]
    for _ in calls:
        await pub.next_event("task")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await pub.disconnect()
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2)
    assert loop.time() - start < 1.0
    assert all(isinstance(r, openai.APIStatusError) and r.status_code == 502 for r in results)
    await pub.aclose()


async def test_consumer_leaving_a_stream_cancels_the_task(replica: tuple[str, Relay]) -> None:
    url, _ = replica
    pub = await publisher(url)
    await pub.register(LLAMA)
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": "Bearer carol-infer-token"}
    ) as http:

        async def read_one_chunk_and_leave() -> None:
            async with http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "llama", "messages": [], "stream": True},
            ) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        return

        consumer = asyncio.create_task(read_one_chunk_and_leave())
        task = await pub.next_event("task")
        await pub.chunks(task["taskId"], [chat_chunk("a")], offset=0)
        await asyncio.wait_for(consumer, 5)
    cancel = await pub.next_event("cancel", timeout=1)
    assert cancel == {"taskId": task["taskId"]}
    assert (await pub.chunks(task["taskId"], [chat_chunk("b")], offset=1)).status_code == 404
    await pub.aclose()


async def test_slow_first_chunk_starts_the_stream_with_keepalives(
    make_settings: Callable[..., Settings], fake_clients: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("relay.api.openai.STREAM_HEADSTART_SECONDS", 0.05)
    monkeypatch.setattr("relay.service.KEEPALIVE_SECONDS", 0.05)
    async with serve_replica(make_settings(), fake_clients) as (url, _):
        pub = await publisher(url)
        await pub.register(LLAMA)
        async with httpx.AsyncClient(base_url=url) as http:
            async with http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "llama", "messages": [], "stream": True},
            ) as resp:
                assert resp.status_code == 200  # headers came before any chunk
                task = await pub.next_event("task")
                lines = resp.aiter_lines()
                assert await anext(lines) == ": keep-alive"
                await pub.chunks(task["taskId"], [chat_chunk("late")], offset=0)
                await pub.result(task["taskId"], {"error": "backend went away"})
                rest = [line async for line in lines if line.startswith("data: ")]
        assert "late" in rest[0] and "backend went away" in rest[-1]
        await pub.aclose()


async def test_chunks_resent_with_offset_are_delivered_once(replica: tuple[str, Relay]) -> None:
    url, _ = replica
    pub = await publisher(url)
    await pub.register(LLAMA)
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": "Bearer carol-infer-token"}
    ) as http:

        async def consume() -> list[str]:
            out = []
            async with http.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "llama", "messages": [], "stream": True},
            ) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: "):
                        out.append(line[6:])
            return out

        call = asyncio.create_task(consume())
        task = await pub.next_event("task")
        tid = task["taskId"]
        await pub.chunks(tid, [chat_chunk("0"), chat_chunk("1")], offset=0)
        await pub.chunks(
            tid, [chat_chunk("1"), chat_chunk("2")], offset=1
        )  # a retry overlapping by one
        await pub.chunks(tid, [chat_chunk("3")], offset=3)
        await pub.result(tid, {"status": 200})
        lines = await asyncio.wait_for(call, 5)
    texts = [orjson.loads(x)["choices"][0]["delta"]["content"] for x in lines[:-1]]
    assert texts == ["0", "1", "2", "3"] and lines[-1] == "[DONE]"
    await pub.aclose()


async def test_error_after_stream_started_is_a_final_error_event(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI
) -> None:
    async def handler(pub: ScriptedPublisher, task: dict[str, Any]) -> None:
        await pub.chunks(task["taskId"], [chat_chunk("partial")], offset=0)
        await pub.result(task["taskId"], {"error": "backend stream broke"})

    pub = await publisher(replica[0], handler=handler)
    await pub.register(LLAMA)
    stream = await consumer.chat.completions.create(model="llama", messages=[], stream=True)
    got = []
    with pytest.raises(openai.APIError, match="backend stream broke"):
        async for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    assert got == ["partial"]
    await pub.aclose()


async def test_admin_public_rows_never_show_the_key(replica: tuple[str, Relay]) -> None:
    url, _ = replica
    async with httpx.AsyncClient(base_url=url) as http:
        admin = {"authorization": "Bearer root-admin-token"}
        body = {
            "name": "gpt",
            "url": "http://127.0.0.1:9/v1",
            "model": "gpt-4o",
            "apiKey": "sk-secret",
        }
        r = await http.post(
            "/api/v1/llms", json=body, headers={"authorization": "Bearer carol-infer-token"}
        )
        assert r.status_code == 403
        r = await http.post("/api/v1/llms", json=body, headers=admin)
        assert r.status_code == 200 and "apiKey" not in r.json()
        listed = (await http.get("/api/v1/llms", headers=admin)).json()["llms"]
        assert [x["name"] for x in listed] == ["gpt"] and "sk-secret" not in str(listed)
        one = await http.get("/api/v1/llms/gpt", headers=admin)
        assert one.json()["kind"] == "public" and "apiKey" not in one.json()
        r = await http.post(
            "/v1/chat/completions", json={"model": "gpt", "messages": []}, headers=admin
        )
        assert r.status_code == 502 and "unreachable" in r.json()["error"]["message"]
        assert (await http.delete("/api/v1/llms/gpt", headers=admin)).status_code == 204
        assert (await http.get("/api/v1/llms/gpt", headers=admin)).status_code == 404


async def test_public_row_proxies_to_upstream(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> None:
    import uvicorn

    from relay.toy_backend import create_toy_backend
    from tests.support.procs import free_port

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_toy_backend(), host="127.0.0.1", port=port, log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        async with serve_replica(make_settings(), fake_clients) as (url, _):
            async with httpx.AsyncClient(base_url=url) as http:
                await http.post(
                    "/api/v1/llms",
                    json={
                        "name": "toy",
                        "url": f"http://127.0.0.1:{port}/v1",
                        "model": "toy-model",
                    },
                )
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            reply = await client.chat.completions.create(
                model="toy", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content == "echo: hi"
            stream = await client.chat.completions.create(
                model="toy", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            assert "echo: hi" in "".join(
                [c.choices[0].delta.content or "" async for c in stream if c.choices]
            )
            await client.close()
    finally:
        server.should_exit = True
        await serving


async def test_logs_never_contain_tokens(
    replica: tuple[str, Relay], consumer: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pub = await publisher(replica[0], handler=echo_handler)
    await pub.register(LLAMA)
    await consumer.chat.completions.create(
        model="llama", messages=[{"role": "user", "content": "x"}]
    )
    await pub.aclose()
    assert "alice-publish-token" not in caplog.text and "carol-infer-token" not in caplog.text
    assert "registered llama" in caplog.text


async def wait_for_status(relay: Relay, name: str, status: str, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while ((await relay.store.get_row(name)) or {}).get("status") != status:
            await asyncio.sleep(0.01)


async def test_a_local_chunk_post_cannot_overtake_one_in_the_inbox(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> None:
    """Publisher on A, consumer on B. A batch posted to A travels through B's
    inbox; the next one, posted to B itself, is delivered at once. Holding B's
    inbox shows that the consumer still gets every chunk once and in order,
    and that the end of the stream waits for the batches before it."""
    server = fake_clients.commands.connection_pool.connection_kwargs["server"]
    b_clients = Clients(
        fakeredis.FakeAsyncRedis(server=server), fakeredis.FakeAsyncRedis(server=server)
    )
    prefix = "shared"
    async with (
        serve_replica(make_settings(redis_prefix=prefix, replica_id="ra"), fake_clients) as (
            url_a,
            _,
        ),
        serve_replica(make_settings(redis_prefix=prefix, replica_id="rb"), b_clients) as (
            url_b,
            relay_b,
        ),
    ):
        pub = await publisher(url_a)
        await pub.register(LLAMA)
        to_b = ScriptedPublisher(url_b)  # the same session, posting through replica B
        to_b.session_id = pub.session_id
        held: list[Any] = []
        dispatch = relay_b.inbox._dispatch
        relay_b.inbox._dispatch = held.append  # B's inbox is slow for a while
        async with httpx.AsyncClient(base_url=url_b, timeout=10) as http:

            async def consume() -> list[str]:
                body = {"model": "llama", "messages": [], "stream": True}
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    return [
                        line[6:] async for line in resp.aiter_lines() if line.startswith("data: ")
                    ]

            call = asyncio.create_task(consume())
            task = await pub.next_event("task")
            tid = task["taskId"]
            assert (
                await pub.chunks(tid, [chat_chunk("0"), chat_chunk("1")], offset=0)
            ).status_code == 200
            assert (await to_b.chunks(tid, [chat_chunk("2")], offset=2)).status_code == 200
            assert (await to_b.result(tid, {"status": 200})).status_code == 200
            async with asyncio.timeout(5):
                while len(held) < 2:  # the first batch and the end, both in B's inbox
                    await asyncio.sleep(0.01)
            relay_b.inbox._dispatch = dispatch
            for message in held:
                dispatch(message)
            lines = await asyncio.wait_for(call, 5)
        texts = [orjson.loads(x)["choices"][0]["delta"]["content"] for x in lines[:-1]]
        assert texts == ["0", "1", "2"] and lines[-1] == "[DONE]"
        await pub.aclose()
        await to_b.aclose()


async def test_consumer_hanging_up_a_plain_request_cancels_the_task(
    replica: tuple[str, Relay],
) -> None:
    url, relay = replica
    pub = await publisher(url)  # receives the task, never answers
    await pub.register(LLAMA)
    async with httpx.AsyncClient(
        base_url=url, headers={"authorization": "Bearer carol-infer-token"}
    ) as http:
        call = asyncio.create_task(
            http.post("/v1/chat/completions", json={"model": "llama", "messages": []})
        )
        task = await pub.next_event("task")
        call.cancel()  # the consumer gives up: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await call
    cancel = await pub.next_event("cancel", timeout=2)
    assert cancel == {"taskId": task["taskId"]}
    assert (await pub.result(task["taskId"], {"status": 200, "body": {}})).status_code == 404
    async with asyncio.timeout(2):
        while len(relay.pending):
            await asyncio.sleep(0.01)
    await pub.aclose()
