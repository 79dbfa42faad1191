"""Prometheus metrics count what happened, and read live state at scrape time."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from relay.config import Settings
from relay.connections import Clients
from tests.support.inproc import serve_replica
from tests.support.scripted import ScriptedPublisher, echo_handler


def value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in:\n{text}")


async def test_counters_and_live_gauges(
    make_settings: Callable[..., Settings], fake_clients: Clients
) -> None:
    async with serve_replica(make_settings(), fake_clients) as (url, _):
        pub = ScriptedPublisher(url, handler=echo_handler)
        await pub.connect()
        await pub.register({"name": "m", "type": "openai", "model": "x"})
        async with httpx.AsyncClient(base_url=url) as http:
            body = {
                "model": "m",
                "messages": [{"role": "user", "content": "a b c"}],
                "stream": True,
            }
            assert (await http.post("/v1/chat/completions", json=body)).status_code == 200
            assert (
                await http.post("/v1/chat/completions", json={"model": "nope"})
            ).status_code == 404
            scraped = await http.get("/metrics")  # no token needed, like the probes
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith(
            "text/plain"
        )
        text = scraped.text
        assert value(text, 'relay_requests_total{outcome="ok"}') == 1
        assert value(text, 'relay_requests_total{outcome="unknown"}') == 1
        assert value(text, 'relay_tasks_finished_total{result="answered"}') == 1
        assert value(text, "relay_chunks_total") == 3
        assert value(text, "relay_sessions_held") == 1
        assert value(text, "relay_inbox_healthy") == 1
        assert "_created" not in text
        await pub.aclose()
