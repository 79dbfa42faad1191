"""The benchmark's load generator: a raw asyncio HTTP/1.1 keep-alive client.

It runs as its own process (so its CPU is measured apart from everything
else, and it never shares a GIL with what it measures) and takes one JSON
command per stdin line, answering one JSON line on stdout. A hand-written
protocol on uvloop costs a few tens of microseconds per request, well under
what the relay or even the toy backend spends, so it is not the bottleneck;
the bench reports its CPU to show that.

Commands (``op``):

* ``latency``: ``n`` requests one after another, round-robin over ``targets``.
* ``load``: ``concurrency`` connections (spread over ``targets``) sending
  back to back for ``duration`` seconds; streams count SSE ``data:`` events
  and the time to the first one.
* ``sessions``: open ``n`` publisher control channels on ``target`` and hold
  them until ``close_sessions``.
* ``quit``.

Only the standard library (and uvloop when present), so it can be read in
one sitting and started with any Python.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

Target = tuple[str, int]


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.done: asyncio.Future[int] | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._reset()

    def _reset(self) -> None:
        self.head_done = False
        self.status = 0
        self.length = -1  # content-length, -1 when chunked
        self.chunked = False
        self.events = 0  # SSE data events seen (streams)
        self.first_event = 0.0  # perf_counter of the first data event
        self.on_event: Any = None  # sessions: called once the first event arrives

    # --- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            self._parse()
        except Exception as exc:  # a malformed answer fails this request
            if self.done is not None and not self.done.done():
                self.done.set_exception(exc)

    # --- requests --------------------------------------------------------------
    def send(self, request: bytes) -> asyncio.Future[int]:
        self._reset()
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self.done

    def _finish(self) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_result(self.status)

    def _parse(self) -> None:
        buf = self.buf
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            self.status = int(head[9:12])
            self.head_done = True
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                self.length = int(head[i + 17 : j if j >= 0 else None])
            elif b"\r\ntransfer-encoding: chunked" in head:
                self.chunked = True
            else:
                self.length = 0
        if not self.chunked:
            if len(buf) >= self.length:
                del buf[: self.length]
                self._finish()
            return
        while True:
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            size = int(bytes(buf[:eol]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < eol + 4:
                    return
                del buf[: eol + 4]
                self._finish()
                return
            if len(buf) < eol + 2 + size + 2:
                return
            chunk = bytes(buf[eol + 2 : eol + 2 + size])
            del buf[: eol + 2 + size + 2]
            n = chunk.count(b"data: ")
            if n:
                n -= chunk.count(b"data: [DONE]")
                if n > 0:
                    if not self.events:
                        self.first_event = time.perf_counter()
                        if self.on_event is not None:
                            self.on_event()
                    self.events += n


async def connect(target: Target) -> HttpConn:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(HttpConn, target[0], target[1])
    return conn


def build_request(
    method: str, target: Target, path: str, headers: dict[str, str], body: bytes
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target[0]}:{target[1]}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def op_latency(cmd: dict[str, Any]) -> dict[str, Any]:
    targets = [tuple(t) for t in cmd["targets"]]
    body = cmd["body"].encode()
    conns = [await connect(t) for t in targets]
    reqs = [build_request("POST", t, cmd["path"], cmd["headers"], body) for t in targets]
    lat: list[float] = []
    errors = 0
    try:
        for i in range(cmd["n"]):
            k = i % len(conns)
            t0 = time.perf_counter()
            status = await conns[k].send(reqs[k])
            lat.append(time.perf_counter() - t0)
            errors += status != 200
    finally:
        for c in conns:
            assert c.transport is not None
            c.transport.close()
    return {"latencies": lat, "errors": errors}


async def op_load(cmd: dict[str, Any]) -> dict[str, Any]:
    targets = [tuple(t) for t in cmd["targets"]]
    body = cmd["body"].encode()
    conc: int = cmd["concurrency"]
    conns = await asyncio.gather(*(connect(targets[i % len(targets)]) for i in range(conc)))
    reqs = [
        build_request("POST", targets[i % len(targets)], cmd["path"], cmd["headers"], body)
        for i in range(conc)
    ]
    lat: list[float] = []
    ttfc: list[float] = []
    counts = {"requests": 0, "events": 0, "errors": 0}
    start = time.perf_counter()
    end = start + cmd["duration"]

    async def worker(i: int) -> None:
        conn, req = conns[i], reqs[i]
        while True:
            t0 = time.perf_counter()
            if t0 >= end:
                return
            status = await conn.send(req)
            t1 = time.perf_counter()
            if status != 200:
                counts["errors"] += 1
            counts["requests"] += 1
            counts["events"] += conn.events
            lat.append(t1 - t0)
            if conn.events:
                ttfc.append(conn.first_event - t0)

    try:
        await asyncio.gather(*(worker(i) for i in range(conc)))
    finally:
        for c in conns:
            assert c.transport is not None
            c.transport.close()
    elapsed = time.perf_counter() - start
    return {**counts, "elapsed": elapsed, "latencies": lat, "ttfc": ttfc}


class Sessions:
    """Idle publisher control channels held open for the memory figure."""

    def __init__(self) -> None:
        self.conns: list[HttpConn] = []

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        target: Target = tuple(cmd["target"])
        req = build_request("GET", target, cmd["path"], cmd["headers"], b"")
        loop = asyncio.get_running_loop()
        opened = 0
        failed = 0

        async def one() -> None:
            nonlocal opened, failed
            try:
                conn = await connect(target)
            except OSError:
                failed += 1
                return
            got: asyncio.Future[int] = loop.create_future()
            fut = conn.send(req)

            def opened_now() -> None:
                if not got.done():
                    got.set_result(0)

            conn.on_event = opened_now
            # A channel that ends early fails ``fut``; one that opens sends a
            # ``session`` event first, which is all we wait for.
            await asyncio.wait([got, fut], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if got.done():
                self.conns.append(conn)
                opened += 1
            else:
                failed += 1
                assert conn.transport is not None
                conn.transport.close()

        batch = cmd.get("batch", 200)
        for i in range(0, cmd["n"], batch):
            await asyncio.gather(*(one() for _ in range(min(batch, cmd["n"] - i))))
        return {"opened": opened, "failed": failed}

    async def close(self) -> dict[str, Any]:
        for c in self.conns:
            assert c.transport is not None
            c.transport.close()
        n = len(self.conns)
        self.conns = []
        return {"closed": n}


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    sessions = Sessions()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = await reader.readline()
        if not line:
            return
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "latency":
                out = await op_latency(cmd)
            elif op == "load":
                out = await op_load(cmd)
            elif op == "sessions":
                out = await sessions.open(cmd)
            elif op == "close_sessions":
                out = await sessions.close()
            elif op == "quit":
                return
            else:
                out = {"error": f"unknown op {op!r}"}
        except Exception as exc:
            out = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, a little slower
        asyncio.run(main())
    else:
        uvloop.run(main())
