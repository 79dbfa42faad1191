"""Wake tasks: bring a hibernating backend up before the relay sends work."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from relay import wire

from .runner import ProviderRuntime

__all__ = ["Waker"]

log = logging.getLogger(__name__)

Heartbeat = Callable[[], Awaitable[None]]


class Waker:
    """Runs wake tasks for the agent."""

    def __init__(self, heartbeat: Heartbeat, *, poll_interval: float = 1.0) -> None:
        self._heartbeat = heartbeat
        self._poll_interval = poll_interval

    async def wake(self, provider: ProviderRuntime, task_id: str) -> wire.ResultPost:
        """Answer a wake task: success when the backend is (or becomes) up."""
        started = time.monotonic()
        up, why = await provider.backend.available()
        if up:
            return {"status": 200, "body": {"ok": True, "ms": _ms(started)}}
        return {"error": f"provider {provider.name} has no wake recipe and is down: {why}"}


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
