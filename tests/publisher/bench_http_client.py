"""Micro-benchmark: httpx.AsyncClient vs aiohttp.ClientSession for the agent.

Not a test (pytest does not collect it). Run by hand::

    .venv/bin/python tests/publisher/bench_http_client.py [N]

A small Starlette app runs under uvicorn in a child process (so its CPU is
not counted); this process sends N small JSON POSTs sequentially, then N with
64 in flight, through each client, and prints requests/s and the client's own
CPU time per request (the agent's overhead on the critical path).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import sys
import time
from collections.abc import Awaitable, Callable

import aiohttp
import httpx
import orjson

PAYLOAD = {"chunks": ['{"id":"x","choices":[{"delta":{"content":"hi"}}]}'] * 4, "offset": 0}
CONCURRENCY = 64


def _serve(sock: socket.socket) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def post(request: Request) -> Response:
        await request.body()
        return Response(b'{"ok":true}', media_type="application/json")

    app = Starlette(routes=[Route("/post", post, methods=["POST"])])
    config = uvicorn.Config(app, log_level="error", lifespan="off", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


async def _measure(
    name: str, n: int, send: Callable[[], Awaitable[None]], concurrency: int
) -> None:
    for _ in range(50):  # warm the connection pool
        await send()
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await send()

    wall, cpu = time.perf_counter(), time.process_time()
    if concurrency == 1:
        for _ in range(n):
            await send()
    else:
        await asyncio.gather(*(one() for _ in range(n)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    mode = "sequential" if concurrency == 1 else f"{concurrency} in flight"
    print(f"{name:8} {mode:14} {n / wall:8.0f} req/s   client CPU {cpu / n * 1e6:6.0f} us/req")


async def _bench(url: str, n: int) -> None:
    body = orjson.dumps(PAYLOAD)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer x"}

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as hc:

        async def httpx_send() -> None:
            r = await hc.post(url, content=body, headers=headers)
            orjson.loads(r.content)

        for conc in (1, CONCURRENCY):
            await _measure("httpx", n, httpx_send, conc)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as ac:

        async def aiohttp_send() -> None:
            async with ac.post(url, data=body, headers=headers) as r:
                orjson.loads(await r.read())

        for conc in (1, CONCURRENCY):
            await _measure("aiohttp", n, aiohttp_send, conc)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(sock,), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        asyncio.run(_bench(f"http://127.0.0.1:{port}/post", n))
    finally:
        proc.terminate()
        proc.join()


if __name__ == "__main__":
    main()
