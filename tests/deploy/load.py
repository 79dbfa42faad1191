"""A steady consumer load for the deployment tests, and what it saw.

Each loop sends requests back to back, alternating plain and streaming ones,
each with a unique prompt, and checks every answer's content: a plain
answer echoes the prompt; a stream carries the toy backend's pieces
(``echo: <prompt>``, `` 1`` ... `` N-1``) each exactly once, in order,
then ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson


@dataclass
class Outcome:
    kind: str  # "plain" or "stream"
    ok: bool
    status: int | str  # HTTP status, or the exception's name
    started: float  # time.monotonic()
    ended: float
    detail: str = ""
    lost: int = 0  # stream chunks that never came
    duplicated: int = 0  # stream chunks that came more than once
    out_of_order: bool = False

    @property
    def seconds(self) -> float:
        return self.ended - self.started


@dataclass
class Load:
    urls: list[str]  # base URLs; loop i uses urls[i % len(urls)]
    model: str
    chunks: int = 20
    delay: float = 0.01  # toy backend: seconds between stream chunks, or before a reply
    timeout: float = 30.0  # per request, client side: past it counts as a hang
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def run(self, loops: int = 4) -> list[Outcome]:
        """Run ``loops`` request loops until :meth:`stop`; return every outcome."""
        await asyncio.gather(*(self._loop(i) for i in range(loops)))
        return self.outcomes

    def stop(self) -> None:
        self._stop.set()

    async def settled(self, count: int, timeout: float = 30.0) -> None:
        """Wait until ``count`` more requests have succeeded."""
        target = self.successes + count
        async with asyncio.timeout(timeout):
            while self.successes < target:
                await asyncio.sleep(0.02)

    @property
    def successes(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> str:
        kinds = Counter(o.kind for o in self.outcomes)
        ok = Counter(o.kind for o in self.outcomes if o.ok)
        streamed = sum(self.chunks - o.lost for o in self.outcomes if o.kind == "stream")
        return (
            f"{len(self.outcomes)} requests: {ok['plain']}/{kinds['plain']} plain ok, "
            f"{ok['stream']}/{kinds['stream']} streams ok, {len(self.failures())} failed; "
            f"{streamed} stream chunks, {sum(o.lost for o in self.outcomes)} lost, "
            f"{sum(o.duplicated for o in self.outcomes)} duplicated, "
            f"{sum(o.out_of_order for o in self.outcomes)} streams out of order; "
            f"slowest {max((o.seconds for o in self.outcomes), default=0):.2f} s"
        )

    async def _loop(self, i: int) -> None:
        url = self.urls[i % len(self.urls)]
        async with httpx.AsyncClient(base_url=url, timeout=self.timeout) as client:
            for n in itertools.count():
                if self._stop.is_set():
                    return
                one = self._stream if (n + i) % 2 else self._plain
                self.outcomes.append(await one(client, f"loop{i}-{next(self._ids)}"))

    def _body(self, prompt: str, stream: bool) -> dict[str, object]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
            "x_chunks": self.chunks,
            "x_delay": self.delay,
        }

    async def _plain(self, client: httpx.AsyncClient, prompt: str) -> Outcome:
        started = time.monotonic()
        try:
            r = await client.post("/v1/chat/completions", json=self._body(prompt, False))
        except Exception as exc:
            return Outcome("plain", False, type(exc).__name__, started, time.monotonic(), str(exc))
        ended = time.monotonic()
        if r.status_code != 200:
            return Outcome("plain", False, r.status_code, started, ended, _why(r))
        content = r.json()["choices"][0]["message"]["content"]
        ok = content == f"echo: {prompt}"
        return Outcome("plain", ok, 200, started, ended, "" if ok else f"content {content!r}")

    async def _stream(self, client: httpx.AsyncClient, prompt: str) -> Outcome:
        expected = [f"echo: {prompt}"] + [f" {k}" for k in range(1, self.chunks)]
        got: list[str] = []
        done = False
        error = ""
        started = time.monotonic()
        try:
            async with client.stream(
                "POST", "/v1/chat/completions", json=self._body(prompt, True)
            ) as r:
                if r.status_code != 200:
                    await r.aread()
                    return Outcome(
                        "stream", False, r.status_code, started, time.monotonic(), _why(r)
                    )
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        continue
                    event = orjson.loads(data)
                    if "error" in event:
                        error = str(event["error"])
                        continue
                    got.append(event["choices"][0]["delta"].get("content") or "")
        except Exception as exc:
            return Outcome("stream", False, type(exc).__name__, started, time.monotonic(), str(exc))
        ended = time.monotonic()
        counts = Counter(got)
        lost = sum(1 for c in expected if counts[c] == 0)
        duplicated = sum(n - 1 for n in counts.values() if n > 1)
        in_order = [c for c in got if c in set(expected)] == expected
        ok = done and not error and got == expected
        detail = error or ("" if ok else f"got {got[:5]}... done={done}")
        return Outcome(
            "stream", ok, 200, started, ended, detail, lost, duplicated, not in_order and not lost
        )


def _why(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"])
    except Exception:
        return r.text[:200]
