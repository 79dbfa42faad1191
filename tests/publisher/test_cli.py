"""``python -m relay.publisher`` as a real process: signals and exit codes."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from .conftest import Toy, eventually
from .fake_relay import TOKEN, FakeRelay


async def test_sigterm_finishes_running_task_and_exits_0(
    relay: FakeRelay, toy: Toy, tmp_path: Path
) -> None:
    config = tmp_path / "providers.yaml"
    config.write_text(
        f"relay:\n  url: {relay.url}\n  tokenEnv: PUBLISH_TOKEN\n"
        f"providers:\n  - name: toy\n    url: {toy.url}/v1\n    model: toy-model\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.publisher",
        "--config",
        str(config),
        "--log-level",
        "debug",
        env={"PUBLISH_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await relay.wait_for(lambda: len(relay.registrations) >= 1, within=20)
        await relay.task(
            "t1", "toy", {"messages": [{"role": "user", "content": "bye"}], "x_delay": 0.3}
        )
        await eventually(lambda: toy.stats.active == 1)
        proc.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = output.decode()
    assert proc.returncode == 0, text
    result = relay.result("t1")
    assert result is not None and result["status"] == 200
    assert result["body"]["choices"][0]["message"]["content"] == "echo: bye"
    assert "SIGTERM received: shutting down" in text
    assert TOKEN not in text
