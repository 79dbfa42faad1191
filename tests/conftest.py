"""Fixtures shared by every test folder."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from relay.config import Settings, load_settings
from relay.connections import Clients, embedded
from tests.support.procs import RedisProcess, redis_server_binary


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """Settings from explicit values only: the test's environment never leaks in."""

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"redis_prefix": f"t{uuid.uuid4().hex[:8]}"}
        return load_settings({**base, **overrides}, environ={})

    return make


@pytest.fixture
async def fake_clients() -> AsyncIterator[Clients]:
    """An embedded store (fakeredis with Lua) of this test's own."""
    clients = embedded()
    yield clients
    await clients.aclose()


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[RedisProcess]:
    """A private redis-server for this test session (each xdist worker has
    its own); tests isolate themselves with a unique key prefix."""
    if redis_server_binary() is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    proc = RedisProcess()
    yield proc
    proc.stop()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Expose each phase's report on the test item (``item.rep_call``), so
    fixtures can show logs of real processes when a test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
