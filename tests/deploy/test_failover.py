"""Redis Sentinel failover under load: one master, one replica, three
sentinels (down-after 1000 ms) on loopback; two relay replicas and the
housekeeping worker configured with ``--redis-sentinels``; the real
publisher agent on replica A; consumers on both (B's requests cross
replicas through both inboxes). The master is SIGKILLed mid-load."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.deploy.conftest import publishing
from tests.deploy.load import Load
from tests.support.procs import (
    REPO,
    ReplicaProcess,
    SentinelGroup,
    redis_server_binary,
    start_replicas,
    wait_until,
)

pytestmark = [
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
    pytest.mark.timeout(120),
]

TASK_TIMEOUT = 10.0


def start_worker(sentinels: str, prefix: str) -> tuple[subprocess.Popen[bytes], Path]:
    log = Path(tempfile.mkstemp(prefix="relay-worker-", suffix=".log")[1])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "worker",
            "--redis-sentinels",
            sentinels,
            "--redis-master-name",
            "m",
            "--redis-prefix",
            prefix,
            "--gc-interval-seconds",
            "1",
        ],
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


async def test_sentinel_failover_under_load_loses_no_row_and_hangs_nothing(
    toy_backend: str,
) -> None:
    group = await asyncio.to_thread(SentinelGroup)
    prefix = f"fo{uuid.uuid4().hex[:6]}"
    env = {
        "RELAY_REDIS_SENTINELS": group.addresses,
        "RELAY_REDIS_MASTER_NAME": group.name,
        "RELAY_TASK_TIMEOUT_SECONDS": str(TASK_TIMEOUT),
    }
    replicas: list[ReplicaProcess] = []
    worker: subprocess.Popen[bytes] | None = None
    worker_log: Path | None = None
    try:
        replicas = await asyncio.to_thread(
            start_replicas,
            2,
            lambda i: ReplicaProcess(None, prefix=prefix, replica_id=f"s{i}-{prefix}", env=env),
        )
        worker, worker_log = start_worker(group.addresses, prefix)
        a, b = replicas
        # A request may wait out the failover, but never past its task timeout.
        load = Load([b.url, a.url], "failover", chunks=10, delay=0.02, timeout=TASK_TIMEOUT + 5)
        async with publishing(a.url, "failover", toy_backend) as agent:
            running = asyncio.create_task(load.run(loops=4))
            await load.settled(20)
            killed = time.monotonic()
            await asyncio.to_thread(group.kill_master)
            await asyncio.to_thread(
                wait_until,
                lambda: group.master_port() == group.replica.port,
                30,
                "sentinel failover",
                0.05,
            )
            failover = time.monotonic() - killed
            await load.settled(30)
            load.stop()
            outcomes = await asyncio.wait_for(running, 60)

            after_kill = [o for o in outcomes if o.started >= killed and o.ok]
            first_ok = min((o.ended for o in after_kill), default=float("nan")) - killed
            spanning = [o for o in outcomes if o.started < killed + failover and o.ended > killed]
            print(f"sentinel failover under load: {load.summary()}")
            print(
                f"master killed; sentinels promoted the replica after {failover:.2f} s; the "
                f"first request started after the kill succeeded {first_ok:.2f} s after it; "
                f"{len(spanning)} request(s) overlapped the switch, the longest took "
                f"{max((o.seconds for o in spanning), default=0):.2f} s"
            )
            failures = load.failures()
            # Nothing hangs: every request ended within its task timeout (the
            # client gives up 5 s later, which would show as a failure here).
            assert all(o.seconds < TASK_TIMEOUT + 2 for o in outcomes)
            # Requests during the switch waited and succeeded. (A write the
            # master took but never replicated would be lost: its request
            # would end in a 504 after the task timeout. None is expected on
            # loopback; should one happen, it is shown here.)
            assert not failures, "\n".join(
                f"{o.kind} {o.status} after {o.seconds:.2f} s: {o.detail}" for o in failures[:10]
            )
            assert agent.registered.is_set()

            # Every replica is ready again: its inbox reader follows the new master.
            for r in replicas:
                await asyncio.to_thread(
                    wait_until,
                    lambda r=r: httpx.get(r.url + "/readyz").status_code == 200,
                    10,
                    f"{r.replica_id} ready after the failover",
                )
            # No row lost: the Llm is listed, active, on both replicas.
            for r in replicas:
                async with httpx.AsyncClient(base_url=r.url) as client:
                    models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
                assert models["failover"]["status"] == "active", models
            # Cross-replica delivery works through the new master's streams.
            async with httpx.AsyncClient(base_url=b.url, timeout=10) as client:
                for n in range(5):
                    body = {"model": "failover", "messages": [{"role": "user", "content": f"{n}"}]}
                    reply = await client.post("/v1/chat/completions", json=body)
                    assert reply.json()["choices"][0]["message"]["content"] == f"echo: {n}"

        # The worker rode out the failover too, and sweeps the new master.
        assert worker.poll() is None, worker_log.read_text() if worker_log else ""
        swept_before = worker_log.read_text().count("sweep:")
        await asyncio.to_thread(
            wait_until,
            lambda: (
                worker_log is not None and worker_log.read_text().count("sweep:") > swept_before
            ),
            10,
            "a sweep after the failover",
        )
    except BaseException:
        for r in replicas:
            print(f"--- {r.replica_id}\n{r.log()[-4000:]}")
        if worker_log is not None:
            print(f"--- worker\n{worker_log.read_text()[-3000:]}")
        raise
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
            worker.wait(5)
        for r in replicas:
            r.kill()
        group.stop()
