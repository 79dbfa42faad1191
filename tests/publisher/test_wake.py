"""Hibernating backends: registration status and wake tasks (http, command,
vllm), against the fake relay and the toy backend's sleep mode."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from .conftest import StartAgent, free_port, provider, toy_server
from .fake_relay import FakeRelay

# A wake command: POST <url>/wake_up, the way `systemctl start` would bring
# a service up (run without a shell, argv only).
WAKE_SCRIPT = (
    "import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1] + '/wake_up', method='POST'))"
)


def sleepy(url: str, wake: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A provider whose health check fails while the toy sleeps."""
    return provider(url, name="sleepy", health="/health", wake=wake, **extra)


def command(*args: str, **extra: Any) -> dict[str, Any]:
    return {"type": "command", "command": sys.executable, "args": list(args), **extra}


async def wake(relay: FakeRelay, task_id: str = "w1", llm: str = "sleepy") -> dict[str, Any]:
    await relay.wake(task_id, llm)
    return await relay.wait_result(task_id)


def assert_ok(result: dict[str, Any]) -> int:
    assert result["status"] == 200, result
    assert result["body"]["ok"] is True
    ms = result["body"]["ms"]
    assert isinstance(ms, int)
    return ms


# --- registration -----------------------------------------------------------------


async def test_initial_status_depends_on_recipe_and_backend(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    async with toy_server(asleep=True) as asleep, toy_server() as awake:
        await start_agent(
            [
                sleepy(asleep.url, {"type": "http", "url": asleep.url + "/wake_up"}),
                provider(awake.url, name="awake", wake={"type": "vllm", "maxWaitSeconds": 5}),
                provider(down, name="down-without-recipe"),
                # vLLM answers /v1/models while asleep: /is_sleeping decides
                provider(asleep.url, name="vllm", wake={"type": "vllm"}),
            ]
        )
    specs = {p["name"]: p for p in relay.registrations[0]["providers"]}
    assert {n: p["initialStatus"] for n, p in specs.items()} == {
        "sleepy": "hibernating",
        "awake": "active",
        "down-without-recipe": "active",
        "vllm": "hibernating",
    }
    assert specs["sleepy"]["wakeMaxWaitSeconds"] == 30 + 60  # recipe timeout + health wait
    assert specs["awake"]["wakeMaxWaitSeconds"] == 30 + 5
    assert "wakeMaxWaitSeconds" not in specs["down-without-recipe"]


# --- http ----------------------------------------------------------------------------


async def test_http_recipe_success_polls_and_heartbeats(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    async with toy_server(asleep=True, wake_delay=0.15) as toy:
        recipe = {"type": "http", "url": toy.url + "/wake_up", "body": {"reason": "task"}}
        await start_agent([sleepy(toy.url, recipe)], heartbeat_interval=60)
        ms = assert_ok(await wake(relay))
        assert ms >= 150
        assert toy.stats.wake_ups == 1
        assert len(relay.heartbeats) >= 3  # one per poll while the model loaded


async def test_http_recipe_failure_reports_status_and_body(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    async with toy_server(asleep=True) as toy:
        await start_agent([sleepy(toy.url, {"type": "http", "url": toy.url + "/no-such"})])
        result = await wake(relay)
    assert result == {
        "error": f"waking provider sleepy failed: POST {toy.url}/no-such answered 404: Not Found"
    }


async def test_http_recipe_timeout_when_backend_stays_down(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    async with toy_server(asleep=True) as toy:
        recipe = {"type": "http", "url": toy.url + "/v1/models", "method": "GET"}
        await start_agent([sleepy(toy.url, {**recipe, "maxWaitSeconds": 0.2})])
        result = await wake(relay)
    assert result["error"].startswith(
        f"provider sleepy: backend at {toy.url} not available 0.2 s after the wake recipe ran"
    )
    assert "GET /health answered 503" in result["error"]


async def test_http_recipe_request_timeout(relay: FakeRelay, start_agent: StartAgent) -> None:
    held: list[asyncio.StreamWriter] = []  # accept and never answer

    def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with toy_server(asleep=True) as toy:
            url = f"http://127.0.0.1:{port}/power-on"
            await start_agent(
                [sleepy(toy.url, {"type": "http", "url": url, "timeoutSeconds": 0.2})]
            )
            result = await wake(relay)
    finally:
        for writer in held:
            writer.close()
        silent.close()
    assert result == {
        "error": f"waking provider sleepy failed: POST {url} did not answer within 0.2 s"
    }


# --- command -------------------------------------------------------------------------


async def test_command_recipe_success(relay: FakeRelay, start_agent: StartAgent) -> None:
    async with toy_server(asleep=True) as toy:
        await start_agent([sleepy(toy.url, command("-c", WAKE_SCRIPT, toy.url))])
        assert_ok(await wake(relay))
        assert toy.stats.wake_ups == 1
        # and inference works afterwards
        await relay.task("t", "sleepy", {"messages": [{"role": "user", "content": "up?"}]})
        assert (await relay.wait_result("t"))["status"] == 200


async def test_command_recipe_failure_quotes_output(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    async with toy_server(asleep=True) as toy:
        script = "import sys; print('disk on fire', file=sys.stderr); sys.exit(3)"
        await start_agent([sleepy(toy.url, command("-c", script))])
        result = await wake(relay)
    assert result["error"].startswith("waking provider sleepy failed: `")
    assert result["error"].endswith("` exited with code 3: disk on fire")


async def test_command_recipe_timeout_kills_it(relay: FakeRelay, start_agent: StartAgent) -> None:
    async with toy_server(asleep=True) as toy:
        recipe = command("-c", "import time; time.sleep(30)", timeoutSeconds=0.3)
        await start_agent([sleepy(toy.url, recipe)])
        result = await wake(relay)
    assert result["error"].endswith("did not finish within 0.3 s (killed)")


async def test_command_recipe_backend_never_comes_up(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    async with toy_server(asleep=True) as toy:
        await start_agent([sleepy(toy.url, command("-c", "pass", maxWaitSeconds=0.2))])
        result = await wake(relay)
    assert "not available 0.2 s after the wake recipe ran" in result["error"]


async def test_command_never_goes_through_a_shell(
    relay: FakeRelay, start_agent: StartAgent, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    async with toy_server(asleep=True) as toy:
        recipe = {"type": "command", "command": f"true; touch {marker}"}
        await start_agent([sleepy(toy.url, recipe)])
        result = await wake(relay)
    assert "cannot run" in result["error"]
    assert not marker.exists()


# --- vllm ----------------------------------------------------------------------------


async def test_vllm_success(relay: FakeRelay, start_agent: StartAgent) -> None:
    async with toy_server(asleep=True, wake_delay=0.1) as toy:
        await start_agent([provider(toy.url, name="sleepy", wake={"type": "vllm"})])
        assert_ok(await wake(relay))
        assert toy.stats.wake_ups == 1


async def test_vllm_failure_when_unreachable(relay: FakeRelay, start_agent: StartAgent) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    await start_agent([provider(url, name="sleepy", wake={"type": "vllm"})])
    result = await wake(relay)
    assert result["error"].startswith(
        f"waking provider sleepy failed: POST {url}/wake_up failed: Cannot connect"
    )


async def test_vllm_timeout_while_still_sleeping(relay: FakeRelay, start_agent: StartAgent) -> None:
    async with toy_server(asleep=True, wake_delay=30) as toy:
        wake_cfg = {"type": "vllm", "maxWaitSeconds": 0.2}
        await start_agent([provider(toy.url, name="sleepy", wake=wake_cfg)])
        result = await wake(relay)
    assert result["error"].endswith("(last check: vLLM is sleeping)")


# --- shared behaviour -------------------------------------------------------------------


async def test_already_up_skips_the_recipe(relay: FakeRelay, start_agent: StartAgent) -> None:
    async with toy_server() as toy:
        await start_agent([sleepy(toy.url, {"type": "http", "url": toy.url + "/wake_up"})])
        assert_ok(await wake(relay))
        assert toy.stats.wake_ups == 0


async def test_no_recipe_and_down(relay: FakeRelay, start_agent: StartAgent) -> None:
    async with toy_server(asleep=True) as toy:
        await start_agent([provider(toy.url, name="sleepy", health="/health")])
        result = await wake(relay)
    assert result["error"].startswith("provider sleepy has no wake recipe and its backend is not")


async def test_concurrent_wakes_share_one_attempt(
    relay: FakeRelay, start_agent: StartAgent
) -> None:
    async with toy_server(asleep=True, wake_delay=0.1) as toy:
        await start_agent([sleepy(toy.url, {"type": "http", "url": toy.url + "/wake_up"})])
        await relay.wake("w1", "sleepy")
        await relay.wake("w2", "sleepy")
        assert_ok(await relay.wait_result("w1"))
        assert_ok(await relay.wait_result("w2"))
        assert toy.stats.wake_ups == 1
