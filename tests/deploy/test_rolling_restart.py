"""A rolling restart of every replica behind a real load balancer, under load.

Three ``relay serve`` processes on one redis-server, behind nginx
(round-robin, the proxy settings of tests/support/procs.py). The real
publisher agent connects through nginx, so when its replica drains, its
reconnect lands on another one. Four loops send plain and streaming
requests through nginx the whole time, while each replica in turn gets
SIGTERM, drains, exits, and is replaced by a new process (new replica id)
on the same port. Nothing may fail, and no stream may lose, repeat or
reorder a chunk.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest

from tests.deploy.conftest import publishing
from tests.deploy.load import Load
from tests.support.procs import (
    NginxProcess,
    RedisProcess,
    ReplicaProcess,
    nginx_binary,
    redis_server_binary,
    start_replicas,
)

pytestmark = [
    pytest.mark.skipif(
        nginx_binary() is None, reason="nginx is not installed (.ci/run installs it)"
    ),
    pytest.mark.skipif(redis_server_binary() is None, reason="redis-server is not installed"),
    pytest.mark.timeout(120),
]


async def test_rolling_restart_behind_nginx_fails_no_request(
    redis_proc: RedisProcess, toy_backend: str
) -> None:
    prefix = f"roll{uuid.uuid4().hex[:6]}"

    def replica(i: int, generation: int = 0, port: int | None = None) -> ReplicaProcess:
        return ReplicaProcess(
            redis_proc.url, prefix=prefix, replica_id=f"r{i}g{generation}-{prefix}", port=port
        )

    replicas = await asyncio.to_thread(start_replicas, 3, replica)
    retired: list[ReplicaProcess] = []
    nginx: NginxProcess | None = None
    load = Load([""], "rolling", chunks=20, delay=0.02, timeout=30)
    try:
        nginx = NginxProcess([r.port for r in replicas])
        load.urls = [nginx.url]
        async with publishing(nginx.url, "rolling", toy_backend) as agent:
            running = asyncio.create_task(load.run(loops=4))
            await load.settled(20)
            sigterms: list[float] = []
            for i in range(3):
                old = replicas[i]
                sigterms.append(time.monotonic())
                started = time.monotonic()
                code = await asyncio.to_thread(old.terminate, 60)
                drained = time.monotonic() - started
                retired.append(old)
                assert code in (0, -15), (
                    f"replica {old.replica_id} exited with {code}:\n{old.log()}"
                )
                replicas[i] = await asyncio.to_thread(replica, i, 1, old.port)
                print(
                    f"replica {i}: drained and exited in {drained:.2f} s, "
                    f"back as {replicas[i].replica_id} after {time.monotonic() - started:.2f} s"
                )
                await load.settled(20)  # traffic flows over the new set before the next one
            load.stop()
            outcomes = await asyncio.wait_for(running, 60)
            assert agent.registered.is_set()
            reconnects = agent.connects - 1

        spanning = sum(1 for o in outcomes if any(o.started < t < o.ended for t in sigterms))
        held = sum(r.log().count(" held: session ") for r in retired)
        forwarded = sum(r.log().count("held task(s) forwarded") for r in retired)
        retried = sum(1 for line in nginx.access_log() if "ups=" in line and "," in line)
        print(f"rolling restart of 3 replicas under load: {load.summary()}")
        print(
            f"{spanning} requests were in flight at a SIGTERM; the publisher moved "
            f"{reconnects} time(s); {held} task(s) reached a draining replica in the "
            f"reconnect window and were forwarded ({forwarded} handoff(s)); nginx sent "
            f"{retried} request(s) on to another replica"
        )
        failures = load.failures()
        assert not failures, "\n".join(
            f"{o.kind} {o.status} after {o.seconds:.2f} s: {o.detail}" for o in failures[:10]
        )
        assert sum(o.lost + o.duplicated for o in outcomes) == 0
        assert reconnects >= 1, "the publisher's replica was restarted: it must have moved"
        assert spanning > 0, "no request was in flight at a SIGTERM: the test proved nothing"
        async with httpx.AsyncClient(base_url=nginx.url) as client:
            models = (await client.get("/v1/models")).json()["data"]
        # The agent stopped above: its row went inactive only then, not during the restart.
        assert [m["id"] for m in models if m["id"] == "rolling"] == ["rolling"]
    except BaseException:
        for r in [*retired, *replicas]:
            print(f"--- {r.replica_id}\n{r.log()[-4000:]}")
        if nginx is not None:
            print(f"--- nginx\n{nginx.error_log()[-3000:]}")
        raise
    finally:
        load.stop()
        if nginx is not None:
            nginx.stop()
        for r in replicas:
            r.kill()
