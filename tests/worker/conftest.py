"""Fixtures of the worker tests: a controlled clock that also drives
fakeredis key expiry, fakeredis-backed Stores, and a private redis-server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import fakeredis
import pytest

from relay.keys import Keys
from relay.lifecycle import Lifecycle
from relay.store import Store

PREFIX = "t"
T0 = 1_700_000_000.0


class Clock:
    """The sweep's ``now`` and fakeredis's own clock (TTL expiry) in one, so
    that a test lets 90 s or 4 h pass without sleeping."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """fakeredis stamps every command with ``time.time()`` read in this one
    module and expires keys against it; point it at our clock."""
    import fakeredis._socket._base as fake_socket

    c = Clock()
    monkeypatch.setattr(fake_socket, "time", SimpleNamespace(time=c))
    return c


@pytest.fixture
async def make_store(clock: Clock) -> AsyncIterator[Callable[[], Store]]:
    """Stores on one fakeredis server of this test's own; each call opens
    another client (another worker replica, say)."""
    server = fakeredis.FakeServer()
    clients: list[fakeredis.FakeAsyncRedis] = []

    def make() -> Store:
        client = fakeredis.FakeAsyncRedis(server=server)
        clients.append(client)
        return Store(client, Keys(PREFIX), Lifecycle())

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture
def store(make_store: Callable[[], Store]) -> Store:
    return make_store()


# --- a real redis-server ------------------------------------------------------


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private ``redis-server`` on a free port, killed at teardown."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: the real-Redis worker test needs it")
    port = _free_port()
    workdir = tempfile.mkdtemp(prefix="relay-worker-redis-")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not _pong(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server on port {port} did not answer PING within 10 s")
            time.sleep(0.02)
        yield RedisServer(port, proc)
    finally:
        proc.kill()
        proc.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)
