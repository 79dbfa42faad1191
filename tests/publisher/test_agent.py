"""The agent against a fake relay and the toy backend, over real sockets."""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import pytest

from relay.publisher.agent import Agent

from .conftest import StartAgent, Toy, eventually, free_port, provider
from .fake_relay import FakeRelay

HELLO = {"model": "toy", "messages": [{"role": "user", "content": "hello"}]}


def chat(text: str, **knobs: object) -> dict[str, object]:
    return {"model": "toy", "messages": [{"role": "user", "content": text}], **knobs}


async def test_registers_and_heartbeats(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    agent = await start_agent(
        [provider(toy.url, description="a toy"), provider(toy.url, name="toy2")],
        heartbeat_interval=0.03,
    )
    assert agent.session_id == "sess-1"
    reg = relay.registrations[0]
    assert reg["sessionId"] == "sess-1"
    assert reg["providers"] == [
        {
            "name": "toy",
            "type": "openai",
            "model": "toy-model",
            "description": "a toy",
            "initialStatus": "active",
        },
        {"name": "toy2", "type": "openai", "model": "toy-model", "initialStatus": "active"},
    ]
    await relay.wait_for(lambda: len(relay.heartbeats) >= 3)
    assert {sid for _, sid in relay.heartbeats} == {"sess-1"}
    assert agent.registered_names == ["toy", "toy2"]


async def test_non_streaming_rewrites_model_and_adds_api_key(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url, apiKey="sk-backend")])
    await relay.task("t1", "toy", HELLO)
    result = await relay.wait_result("t1")
    assert result["status"] == 200
    assert result["body"]["object"] == "chat.completion"
    assert result["body"]["choices"][0]["message"]["content"] == "echo: hello"
    assert toy.stats.bodies[0]["model"] == "toy-model"  # the backend's id, not the Llm name
    assert toy.stats.headers[0]["authorization"] == "Bearer sk-backend"
    assert relay.posts[0].session == "sess-1"  # X-Relay-Session


@pytest.mark.parametrize(
    ("path", "body", "check"),
    [
        ("/v1/completions", {"prompt": "hi"}, ("choices", 0, "text", "echo: hi")),
        ("/v1/embeddings", {"input": "hi"}, ("object", None, None, "list")),
    ],
)
async def test_other_endpoints(
    relay: FakeRelay,
    toy: Toy,
    start_agent: StartAgent,
    path: str,
    body: dict[str, object],
    check: tuple[str, int | None, str | None, str],
) -> None:
    await start_agent([provider(toy.url)])
    await relay.task("t1", "toy", {"model": "toy", **body}, path=path)
    result = await relay.wait_result("t1")
    assert result["status"] == 200
    value = result["body"][check[0]]
    if check[1] is not None:
        value = value[check[1]][check[2]]
    assert value == check[3]


async def test_streaming_200_chunks_in_order_and_batched(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    relay.chunk_delay = 0.005  # each chunks post takes a while: the next ones batch up
    await start_agent([provider(toy.url)])
    await relay.task("s1", "toy", chat("hi", stream=True, x_chunks=200), stream=True)
    result = await relay.wait_result("s1")
    assert result == {"status": 200}

    chunks = relay.chunks("s1")
    assert len(chunks) == 200
    contents = [orjson.loads(c)["choices"][0]["delta"]["content"] for c in chunks]
    assert contents == ["echo: hi"] + [f" {i}" for i in range(1, 200)]
    assert orjson.loads(chunks[0])["object"] == "chat.completion.chunk"
    assert "[DONE]" not in chunks

    posts = relay.chunk_posts("s1")
    assert 1 < len(posts) < 200, "chunks were not batched"
    offsets = [p.body["offset"] for p in posts]
    expected = 0
    for post, offset in zip(posts, offsets, strict=True):
        assert offset == expected
        expected += len(post.body["chunks"])
    assert relay.max_inflight["s1"] == 1
    # the result is posted only after the last chunks post completed
    assert relay.posts[-1].kind == "result"
    assert toy.stats.bodies[0]["stream"] is True


@pytest.mark.parametrize("status", [400, 500])
async def test_backend_http_error_is_passed_through(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent, status: int
) -> None:
    await start_agent([provider(toy.url)])
    await relay.task("e1", "toy", chat("x", x_status=status))
    await relay.task("e2", "toy", chat("x", x_status=status, stream=True), stream=True)
    for task_id in ("e1", "e2"):
        result = await relay.wait_result(task_id)
        assert result["status"] == status
        assert result["body"]["error"]["code"] == status
    assert relay.chunks("e2") == []


async def test_backend_down_reports_error_naming_provider(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    await start_agent([provider(url, name="gone")])
    await relay.task("d1", "gone", HELLO)
    await relay.task("d2", "gone", chat("x", stream=True), stream=True)
    for task_id in ("d1", "d2"):
        result = await relay.wait_result(task_id)
        assert set(result) == {"error"}
        assert result["error"].startswith(f"backend gone at {url} unreachable: ")


async def test_backend_timeout_reports_error(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url, requestTimeoutSeconds=0.1)])
    await relay.task("slow", "toy", chat("x", x_delay=2))
    result = await relay.wait_result("slow")
    assert result["error"] == f"backend toy at {toy.url} unreachable: no answer within 0.1 s"


async def test_broken_stream_delivers_chunks_then_error(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url)])
    await relay.task("b1", "toy", chat("x", x_chunks=10, x_break_after=3), stream=True)
    result = await relay.wait_result("b1")
    assert "unreachable: stream broken" in result["error"]
    assert len(relay.chunks("b1")) == 3


async def test_undeliverable_stream_still_ends_with_an_error(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    relay.reject_chunks = True
    await start_agent([provider(toy.url)])
    await relay.task("r1", "toy", chat("x", x_chunks=50, x_delay=0.005), stream=True)
    result = await relay.wait_result("r1")
    assert result["error"].startswith("publisher could not deliver the stream to the relay:")
    assert "422" in result["error"]
    await eventually(lambda: toy.stats.disconnects == 1)  # backend request aborted


async def test_unknown_provider(relay: FakeRelay, toy: Toy, start_agent: StartAgent) -> None:
    await start_agent([provider(toy.url)])
    await relay.task("u1", "nope", HELLO)
    assert (await relay.wait_result("u1")) == {
        "error": "no provider named 'nope' in this publisher"
    }


async def test_slow_stream_does_not_delay_other_tasks_or_heartbeats(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url)], heartbeat_interval=0.02)
    await relay.task("slow", "toy", chat("x", x_chunks=40, x_delay=0.02), stream=True)
    await relay.wait_for(lambda: len(relay.chunks("slow")) >= 1)
    started = time.monotonic()
    await relay.task("fast", "toy", HELLO)
    await relay.wait_result("fast")
    assert time.monotonic() - started < 0.3
    beats = len(relay.heartbeats)
    await relay.wait_for(lambda: len(relay.heartbeats) >= beats + 5)
    assert relay.result("slow") is None, "heartbeats should flow while the stream runs"
    assert (await relay.wait_result("slow")) == {"status": 200}


async def test_max_concurrency_queues_fifo(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url, maxConcurrency=2)])
    for i in range(6):
        await relay.task(f"q{i}", "toy", chat(f"m{i}", x_delay=0.05))
    for i in range(6):
        assert (await relay.wait_result(f"q{i}"))["status"] == 200
    assert toy.stats.max_active == 2
    order = [b["messages"][0]["content"] for b in toy.stats.bodies]
    assert order == [f"m{i}" for i in range(6)]


async def test_cancel_aborts_backend_request(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    agent = await start_agent([provider(toy.url)])
    await relay.task("c1", "toy", chat("x", x_chunks=1000, x_delay=0.01), stream=True)
    await relay.wait_for(lambda: len(relay.chunks("c1")) >= 1)
    await relay.send("cancel", {"taskId": "c1"})
    await eventually(lambda: toy.stats.disconnects == 1)
    await eventually(lambda: agent._runner is not None and agent._runner.running == 0)
    assert relay.result("c1") is None
    assert len(relay.chunks("c1")) < 1000


async def test_task_gone_at_relay_stops_the_stream(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url)])
    await relay.task("g1", "toy", chat("x", x_chunks=1000, x_delay=0.01), stream=True)
    await relay.wait_for(lambda: len(relay.chunks("g1")) >= 1)
    relay.gone_tasks.add("g1")  # the relay answers 404 from now on
    await eventually(lambda: toy.stats.disconnects == 1)
    assert relay.result("g1") is None


async def test_reconnects_with_backoff_and_resumes_session(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay.publisher")
    agent = await start_agent([provider(toy.url)], backoff_base=0.1)
    first = relay.current
    dropped = time.monotonic()
    await relay.drop()
    second = await relay.wait_connections(2)
    assert second.opened_at - dropped >= 0.07  # backoff 0.1 s +- 20 % jitter
    assert second.requested == first.session_id == second.session_id
    await relay.wait_for(lambda: len(relay.registrations) == 2)
    assert relay.registrations[1]["sessionId"] == first.session_id
    await asyncio.wait_for(agent.registered.wait(), 5)
    assert agent.connects == 2
    assert "relay connection lost (the relay closed the stream); reconnecting in" in caplog.text
    assert "(attempt 1)" in caplog.text
    # tasks flow over the new connection
    await relay.task("after", "toy", HELLO)
    assert (await relay.wait_result("after"))["status"] == 200


async def test_backoff_grows_while_relay_is_down(toy: Toy) -> None:
    from relay.publisher.config import PublisherConfig

    config = PublisherConfig.build(f"http://127.0.0.1:{free_port()}", "t", [provider(toy.url)])
    agent = Agent(config, backoff_base=0.5, backoff_cap=30)
    delays = [agent._backoff(n) for n in range(1, 10)]
    assert 0.4 <= delays[0] <= 0.6
    assert 0.8 <= delays[1] <= 1.2
    assert delays[-1] <= 30 and delays[-1] >= 24
    # and the loop really retries against a dead relay, then stops cleanly
    agent = Agent(config, backoff_base=0.01, backoff_cap=0.02)
    task = asyncio.create_task(agent.run())
    await eventually(lambda: agent.connects == 0 and not agent.registered.is_set())
    await asyncio.wait_for(agent.stop(), 5)
    assert task.done()


async def test_reconnect_event_resumes_immediately(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    await start_agent([provider(toy.url)], backoff_base=10, backoff_cap=10)
    first = relay.current
    sent = time.monotonic()
    await relay.send("reconnect", {})
    second = await relay.wait_connections(2, within=2)
    assert second.opened_at - sent < 1.0
    assert second.requested == first.session_id == second.session_id


async def test_silent_connection_is_treated_as_dead(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    relay.ping_interval = None  # no keep-alive comments
    await start_agent([provider(toy.url)], idle_timeout=0.2)
    second = await relay.wait_connections(2, within=3)
    assert second.requested == relay.connections[0].session_id


async def test_heartbeat_404_starts_a_fresh_session(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    agent = await start_agent([provider(toy.url)], heartbeat_interval=0.02)
    relay.sessions.clear()  # the relay forgot every session (e.g. store flushed)
    second = await relay.wait_connections(2)
    assert second.requested is None
    assert second.session_id == "sess-2"
    await relay.wait_for(lambda: relay.registrations[-1]["sessionId"] == "sess-2")
    await eventually(lambda: agent.session_id == "sess-2" and agent.registered.is_set())


async def test_new_session_id_on_resume_is_adopted(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    agent = await start_agent([provider(toy.url)])
    relay.resume_sessions = False
    await relay.send("reconnect", {})
    second = await relay.wait_connections(2)
    assert second.requested == "sess-1" and second.session_id == "sess-2"
    await relay.wait_for(lambda: relay.registrations[-1]["sessionId"] == "sess-2")
    await relay.task("t", "toy", HELLO)
    await relay.wait_result("t")
    assert relay.posts[-1].session == "sess-2"
    assert agent.session_id == "sess-2"


@pytest.mark.parametrize("named", [True, False])
async def test_register_conflict_keeps_serving_the_others(
    relay: FakeRelay,
    toy: Toy,
    start_agent: StartAgent,
    caplog: pytest.LogCaptureFixture,
    named: bool,
) -> None:
    relay.taken = {"taken": 'name "taken" is published by someone else'}
    relay.detail_names_conflict = named
    agent = await start_agent([provider(toy.url), provider(toy.url, name="taken")])
    assert agent.registered_names == ["toy"]
    assert agent.conflicts == ["taken"]
    assert relay.registrations[-1]["providers"][0]["name"] == "toy"
    assert len(relay.registrations[-1]["providers"]) == 1
    assert "provider taken: the name is already published on the relay" in caplog.text
    await relay.task("t", "toy", HELLO)
    assert (await relay.wait_result("t"))["status"] == 200


async def test_taken_name_is_retried_until_free(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    relay.taken = {"taken": "Llm 'taken' is served by another live session (s0)"}
    agent = await start_agent(
        [provider(toy.url), provider(toy.url, name="taken")],
        heartbeat_interval=0.02,
        conflict_retry=0.05,
    )
    assert agent.conflicts == ["taken"]
    tries = len(relay.registrations)
    await relay.wait_for(lambda: len(relay.registrations) > tries)  # retried while taken
    relay.taken = {}  # the old session expired
    await eventually(lambda: agent.registered_names == ["toy", "taken"])
    assert agent.conflicts == []


async def test_bad_token_is_retried_with_a_clear_log(
    relay: FakeRelay, toy: Toy, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.publisher.config import PublisherConfig

    config = PublisherConfig.build(relay.url, "wrong", [provider(toy.url)])
    agent = Agent(config, backoff_base=0.01, backoff_cap=0.02)
    task = asyncio.create_task(agent.run())
    await eventually(lambda: "refused the token (401)" in caplog.text)
    await asyncio.wait_for(agent.stop(), 5)
    assert task.done() and "wrong" not in caplog.text


async def test_clean_shutdown_lets_running_tasks_finish(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    agent = await start_agent([provider(toy.url)])
    await relay.task("run", "toy", chat("x", x_delay=0.2))
    await eventually(lambda: toy.stats.active == 1)
    await asyncio.wait_for(agent.stop(), 5)
    assert (relay.result("run") or {}).get("status") == 200
    await relay.wait_for(lambda: relay.current.closed.is_set())
    assert not agent.registered.is_set()


async def test_shutdown_grace_bounds_the_wait(
    relay: FakeRelay, toy: Toy, start_agent: StartAgent
) -> None:
    agent = await start_agent([provider(toy.url)], shutdown_grace=0.1)
    await relay.task("long", "toy", chat("x", x_chunks=1000, x_delay=0.01), stream=True)
    await relay.wait_for(lambda: len(relay.chunks("long")) >= 1)
    started = time.monotonic()
    await asyncio.wait_for(agent.stop(), 5)
    assert time.monotonic() - started < 1.5
    assert relay.result("long") == {"error": "publisher shut down before the task finished"}
    await eventually(lambda: toy.stats.disconnects == 1)
