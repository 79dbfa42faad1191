"""Fixtures of the worker tests: a controlled clock that also drives
fakeredis key expiry, fakeredis-backed Stores, and a private redis-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
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
