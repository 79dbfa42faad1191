"""The arq side: schedule, settings, CLI errors, the job, and the worker
process itself against a real redis-server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from redis.asyncio import Redis

from relay.config import ConfigError, load_settings
from relay.keys import Keys
from relay.lifecycle import Lifecycle
from relay.store import Store
from tests.support.procs import RedisProcess
from tests.worker.conftest import Clock
from tests.worker.helpers import publisher, replica, spec, status
from worker import jobs
from worker.cli import main
from worker.settings import KEEP_RESULT_SECONDS, cron_fields, worker_options

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The settings read RELAY_*: the developer's environment must not leak in."""
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize(
    ("interval", "fields"),
    [
        (1, {"second": set(range(60))}),
        (15, {"second": {0, 15, 30, 45}}),
        (30.0, {"second": {0, 30}}),
        (300, {"second": {0}, "minute": {0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55}}),
        (3600, {"second": {0}, "minute": {0}}),
        (7200, {"second": {0}, "minute": {0}, "hour": set(range(0, 24, 2))}),
    ],
)
def test_cron_schedule_for_intervals_that_divide_the_clock(
    interval: float, fields: dict[str, set[int]]
) -> None:
    assert cron_fields(interval) == fields


@pytest.mark.parametrize("interval", [7, 2.5, 90, 0.5, 5400])
def test_other_intervals_are_refused_naming_the_setting(interval: float) -> None:
    with pytest.raises(ConfigError, match="RELAY_GC_INTERVAL_SECONDS"):
        cron_fields(interval)


def test_worker_options_keep_results_retry_and_separate_prefixes() -> None:
    opts = worker_options(load_settings({"redis_url": "redis://h:1/2", "redis_prefix": "p"}))
    (job,) = opts["cron_jobs"]
    assert job.keep_result_s == KEEP_RESULT_SECONDS > 1
    assert job.unique and job.name == "gc_sweep:p" and job.second == {0, 15, 30, 45}
    assert opts["queue_name"] == "arq:queue:p" and opts["functions"] == []
    rs = opts["redis_settings"]
    assert (rs.host, rs.port, rs.database) == ("h", 1, 2)
    assert rs.retry is not None and rs.retry_on_error


def test_sentinel_settings() -> None:
    opts = worker_options(
        load_settings({"redis_sentinels": "s1:26379, s2:26380", "redis_master_name": "m"})
    )
    rs = opts["redis_settings"]
    assert rs.sentinel and rs.host == [("s1", 26379), ("s2", 26380)]
    assert rs.sentinel_master == "m"


@pytest.mark.parametrize(
    ("argv", "setting"),
    [
        ([], "RELAY_REDIS_URL"),
        (["--redis-url", "redis://h", "--gc-interval-seconds", "7"], "RELAY_GC_INTERVAL_SECONDS"),
        (["--redis-url", "http://h"], "RELAY_REDIS_URL"),
        (["--redis-url", "redis://h", "--redis-prefix", "a{b}"], "RELAY_REDIS_PREFIX"),
        (["--redis-sentinels", "h:1"], "RELAY_REDIS_MASTER_NAME"),
    ],
)
def test_cli_config_errors_exit_2_naming_the_setting(
    argv: list[str], setting: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    assert setting in capsys.readouterr().err


async def test_gc_sweep_job_uses_the_clock_from_ctx(store: Store, clock: Clock) -> None:
    await replica(store, "A", clock.now)
    await publisher(store, "s1", "A", ["llama"], clock.now)
    ctx = {"store": store, "clock": lambda: clock.now + 90}

    result = await jobs.gc_sweep(ctx)

    assert result["rows_deactivated"] == 1.0 and "ms" in result
    assert await status(store, "llama") == "inactive"


async def test_worker_processes_sweep_on_their_schedule(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """Two worker processes at once, a 1 s schedule: the seeded stale row
    turns inactive, and exactly one sweep reports flipping it."""
    prefix = f"w{uuid.uuid4().hex[:8]}"
    client = Redis.from_url(redis_proc.url)
    store = Store(client, Keys(prefix), Lifecycle())
    loop = asyncio.get_running_loop()
    wall = time.time()
    await store.replica_alive("A", 60, wall)
    await store.bind("s1", "alice", "A", "c1", wall)
    await store.register("s1", "alice", [spec("llama")], wall - 1000)  # silent for 1000 s
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = str(REPO)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("wb") as out:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "worker", "--redis-url", redis_proc.url,
                    "--redis-prefix", prefix, "--gc-interval-seconds", "1",
                    stdout=out, stderr=out, env=env, cwd=REPO,
                )
            )  # fmt: skip

    def output() -> str:
        return "\n".join(log.read_text(errors="replace") for log in logs)

    try:
        deadline = loop.time() + 15
        while await status(store, "llama") != "inactive":
            assert all(p.returncode is None for p in procs), output()
            assert loop.time() < deadline, output()
            await asyncio.sleep(0.05)
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        codes = [await asyncio.wait_for(p.wait(), 10) for p in procs]

    text = output()
    assert codes == [0, 0], text
    assert text.count("sweep: 1 row inactive") == 1, text
    assert await client.keys(f"arq:result:gc_sweep:{prefix}:*"), "keep_result not in effect"
    await client.aclose()
