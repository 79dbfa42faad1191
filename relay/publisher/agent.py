"""The publisher agent: one outbound control session to the relay.

The agent keeps a Server-Sent-Events channel open to the relay, registers its
providers on every (re)connect, heartbeats from its own asyncio task, and
hands tasks to :class:`~relay.publisher.runner.TaskRunner`. Connection
failures are routine (NAT timeouts, relay deploys), so they are retried
forever with jittered exponential backoff, resuming the same session id so
the relay can keep the providers' rows.

In-process use (tests, the relay's demo mode)::

    agent = Agent(config)
    runner = asyncio.create_task(agent.run())
    await agent.registered.wait()
    ...
    await agent.stop()
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping, Sequence
from contextlib import aclosing
from typing import Any, Literal

import orjson

from relay import wire

from .backend import Backend
from .config import PublisherConfig
from .httpclient import new_session
from .relay_client import RelayClient, RelayError, RelayStatusError, RelayUnavailable, rows
from .runner import ProviderRuntime, TaskRunner
from .sse import SSEEvent
from .wake import Waker, max_wait

__all__ = ["Agent"]

log = logging.getLogger(__name__)

_Outcome = Literal["reconnect", "eof"]


class _ProtocolError(RelayError):
    """The relay sent something the contract does not allow."""


class Agent:
    """Publishes ``config.providers`` on the relay until :meth:`stop`.

    Timings are constructor arguments so tests can shrink them:
    ``backoff_base``/``backoff_cap`` (reconnect delays), ``idle_timeout``
    (silence that counts as a dead connection; the relay pings every 15 s),
    ``heartbeat_interval`` (overrides the relay's announced interval),
    ``shutdown_grace`` (how long running tasks may finish on stop),
    ``wake_poll_interval`` and ``health_timeout`` (backend health checks),
    ``conflict_retry`` (how often names refused with 409 are tried again).
    """

    def __init__(
        self,
        config: PublisherConfig,
        *,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        idle_timeout: float = 45.0,
        heartbeat_interval: float | None = None,
        shutdown_grace: float = 30.0,
        wake_poll_interval: float = 1.0,
        health_timeout: float = 5.0,
        conflict_retry: float = 60.0,
    ) -> None:
        self.config = config
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.idle_timeout = idle_timeout
        self.shutdown_grace = shutdown_grace
        self.health_timeout = health_timeout
        self.conflict_retry = conflict_retry
        self._heartbeat_override = heartbeat_interval
        self._wake_poll_interval = wake_poll_interval

        self.registered = asyncio.Event()
        """Set once the providers are registered on the current connection;
        cleared while the agent is disconnected."""
        self.session_id: str | None = None
        self.registered_names: list[str] = []
        """Providers the relay accepted at the last registration."""
        self.conflicts: list[str] = []
        """Providers refused at the last registration (name held elsewhere)."""
        self.connects = 0
        """Successful connections so far (session event received)."""

        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._started = False
        self._heartbeat_interval: float | None = heartbeat_interval
        self._heartbeat_kick = asyncio.Event()
        self._conn: asyncio.Task[_Outcome] | None = None
        self._conn_connected = False
        self._fresh_session = False
        self._register_lock = asyncio.Lock()
        self._relay: RelayClient | None = None
        self._runner: TaskRunner | None = None
        self._providers: dict[str, ProviderRuntime] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._registered_at = 0.0
        self._reported_conflicts: set[str] = set()

    # --- public --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop` (or cancellation), reconnecting as needed."""
        if self._started:
            raise RuntimeError("Agent.run() can only be called once")
        self._started = True
        control, tasks, backends = new_session(), new_session(), new_session()
        heartbeat: asyncio.Task[None] | None = None
        waker: Waker | None = None
        try:
            self._relay = RelayClient(
                self.config.relay_url, self.config.token, control=control, tasks=tasks
            )
            self._providers = {
                p.name: ProviderRuntime(
                    p, Backend(p, backends), asyncio.Semaphore(p.max_concurrency)
                )
                for p in self.config.providers
            }
            waker = Waker(
                self.heartbeat,
                backends,
                poll_interval=self._wake_poll_interval,
                health_timeout=self.health_timeout,
            )
            self._runner = TaskRunner(
                self._relay, self._providers, lambda: self.session_id, waker.wake
            )
            heartbeat = asyncio.create_task(self._heartbeat_loop(), name="relay-heartbeat")
            log.info(
                "publishing %s on %s",
                ", ".join(self._providers) or "nothing",
                self.config.relay_url,
            )
            if not self._stopping.is_set():
                await self._session_loop()
        finally:
            self.registered.clear()
            try:
                if self._runner is not None:
                    await self._runner.shutdown(self.shutdown_grace)
            finally:
                if waker is not None:
                    await waker.close()
                for job in [heartbeat, *self._jobs]:
                    if job is not None:
                        job.cancel()
                        await asyncio.wait([job])
                await asyncio.gather(control.close(), tasks.close(), backends.close())
                log.info("publisher stopped (session %s)", self.session_id)
                self._finished.set()

    async def stop(self) -> None:
        """Stop taking tasks, let running ones finish (bounded by
        ``shutdown_grace``), close the session; returns when done."""
        if not self._stopping.is_set():
            log.info("stopping: no new tasks; finishing running ones")
        self._stopping.set()
        if self._conn is not None:
            self._conn.cancel()
        if self._started:
            await self._finished.wait()

    def abort(self) -> None:
        """Like :meth:`stop` but without waiting for running tasks: they are
        aborted at once, each with an error result."""
        if self._runner is not None:
            self._runner.abort()
        self._stopping.set()
        if self._conn is not None:
            self._conn.cancel()

    async def heartbeat(self) -> None:
        """Send one heartbeat now; on 404 start over with a fresh session."""
        relay, sid = self._relay, self.session_id
        if relay is None or sid is None:
            return
        interval = self._heartbeat_interval or 30.0
        try:
            status, body = await relay.heartbeat(sid, within=max(1.0, min(interval, 15.0)))
        except RelayUnavailable as exc:
            level = logging.WARNING if self.registered.is_set() else logging.DEBUG
            log.log(level, "heartbeat for session %s failed: %s", sid, exc)
            return
        if status == 404:
            if sid == self.session_id and not self._stopping.is_set():
                log.warning(
                    "relay does not know session %s (heartbeat 404); reconnecting with a "
                    "fresh session",
                    sid,
                )
                self.session_id = None
                self._fresh_session = True
                if self._conn is not None:
                    self._conn.cancel()
            return
        if status >= 300:
            log.warning("heartbeat for session %s: relay answered %d %.200r", sid, status, body)
            return
        held = {str(name) for name in rows(body)}
        missing = [n for n in self.registered_names if n not in held]
        if not self.registered.is_set() or self._register_lock.locked():
            return
        if missing:
            log.warning(
                "relay no longer lists %s for session %s; registering again",
                ", ".join(missing),
                sid,
            )
        elif not (
            self.conflicts
            and asyncio.get_running_loop().time() - self._registered_at >= self.conflict_retry
        ):
            return
        job = asyncio.create_task(self._reregister())
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    # --- session loop ----------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_cap, self.backoff_base * 2.0 ** (attempt - 1))
        return min(self.backoff_cap, delay * random.uniform(0.8, 1.2))

    async def _session_loop(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._conn_connected = False
            self._fresh_session = False
            conn = self._conn = asyncio.create_task(self._connection(), name="relay-session")
            try:
                await asyncio.wait([conn])
            except asyncio.CancelledError:
                conn.cancel()
                await asyncio.wait([conn])
                raise
            finally:
                self._conn = None
            self.registered.clear()
            if self._stopping.is_set():
                if not conn.cancelled() and conn.exception() is not None:
                    log.debug("session ended during stop: %s", conn.exception())
                break
            if conn.cancelled() and self._fresh_session:
                attempt = 0
                continue  # heartbeat 404: fresh session right away
            exc = None if conn.cancelled() else conn.exception()
            if exc is None and not conn.cancelled() and conn.result() == "reconnect":
                log.info("relay is draining; resuming session %s now", self.session_id)
                attempt = 0
                continue
            if exc is None:
                reason = "the relay closed the stream"
            elif isinstance(exc, RelayStatusError) and exc.status in (401, 403):
                reason = f"the relay refused the token ({exc.status}); check relay.token"
            elif isinstance(exc, RelayError):
                reason = str(exc)
            else:
                log.error("unexpected error in the relay session", exc_info=exc)
                reason = f"{type(exc).__name__}: {exc}"
            attempt = 1 if self._conn_connected else attempt + 1
            delay = self._backoff(attempt)
            log.warning(
                "relay connection lost (%s); reconnecting in %.1f s (attempt %d)",
                reason,
                delay,
                attempt,
            )
            try:
                async with asyncio.timeout(delay):
                    await self._stopping.wait()
            except TimeoutError:
                pass

    async def _connection(self) -> _Outcome:
        """One SSE connection: session event, registration, then task events."""
        assert self._relay is not None and self._runner is not None
        async with aclosing(self._relay.events(self.session_id, self.idle_timeout)) as events:
            async for event in events:
                if not self._conn_connected:
                    if event.event != wire.EVENT_SESSION:
                        raise _ProtocolError(f"expected a session event first, got {event.event!r}")
                    self._on_session(event)
                    self._conn_connected = True
                    self.connects += 1
                    async with self._register_lock:
                        await self._register()
                    self.registered.set()
                    continue
                if event.event == wire.EVENT_TASK:
                    data = _json(event)
                    if data is not None:
                        self._runner.submit(data)
                elif event.event == wire.EVENT_CANCEL:
                    data = _json(event)
                    if data is not None and isinstance(data.get("taskId"), str):
                        self._runner.cancel(data["taskId"])
                elif event.event == wire.EVENT_RECONNECT:
                    return "reconnect"
                elif event.event == wire.EVENT_SESSION:
                    self._on_session(event)
                else:
                    log.debug("ignoring relay event %r", event.event)
        return "eof"

    def _on_session(self, event: SSEEvent) -> None:
        data = _json(event)
        sid = data.get("sessionId") if data is not None else None
        if not isinstance(sid, str) or not sid:
            raise _ProtocolError(f"session event without sessionId: {event.data[:200]!r}")
        interval = data.get("heartbeatIntervalSeconds") if data is not None else None
        if self._heartbeat_override is None and isinstance(interval, int | float) and interval > 0:
            self._heartbeat_interval = float(interval)
        old, self.session_id = self.session_id, sid
        if old is None:
            log.info("connected to the relay, session %s", sid)
        elif old != sid:
            log.warning("relay did not resume session %s; now session %s", old, sid)
        else:
            log.info("reconnected, resumed session %s", sid)
        self._heartbeat_kick.set()

    # --- registration -------------------------------------------------------------------

    async def _specs(self) -> list[wire.ProviderSpec]:
        async def spec(provider: ProviderRuntime) -> wire.ProviderSpec:
            cfg = provider.config
            item: wire.ProviderSpec = {"name": cfg.name, "type": cfg.type, "model": cfg.model}
            if cfg.description:
                item["description"] = cfg.description
            status: wire.Status = wire.ACTIVE
            wait = max_wait(provider)
            if wait is not None:
                item["wakeMaxWaitSeconds"] = wait
                up, why = await provider.backend.available(within=self.health_timeout)
                if not up:
                    status = wire.HIBERNATING
                    log.info("provider %s: backend not available (%s): hibernating", cfg.name, why)
            item["initialStatus"] = status
            return item

        return list(await asyncio.gather(*(spec(p) for p in self._providers.values())))

    async def _register(self) -> None:
        """Register every provider; leave out names the relay says are taken.

        One call with all providers; on 409, the names the answer mentions are
        dropped and the call repeated. If the answer names none, each provider
        is tried alone to find the taken ones, then the rest go in one call, so
        the outcome is the same whether the relay adds or replaces rows.
        """
        assert self._relay is not None
        sid = self.session_id
        assert sid is not None
        remaining = await self._specs()
        conflicts: list[str] = []
        statuses = {s["name"]: s.get("initialStatus", wire.ACTIVE) for s in remaining}
        while remaining:
            status, body = await self._relay.register(sid, remaining)
            if status == 409:
                taken = _mentioned(body, [s["name"] for s in remaining])
                if not taken:
                    taken = await self._probe(sid, remaining)
                if not taken:
                    raise RelayStatusError("register", status, body)
                for name in taken:
                    level = logging.INFO if name in self._reported_conflicts else logging.ERROR
                    log.log(
                        level,
                        "provider %s: the name is already published on the relay by someone "
                        "else (%s); not serving it, retrying every %g s",
                        name,
                        _detail(body),
                        self.conflict_retry,
                    )
                    self._reported_conflicts.add(name)
                conflicts.extend(taken)
                remaining = [s for s in remaining if s["name"] not in taken]
                continue
            if status == 404:
                self.session_id = None
                raise RelayUnavailable(f"register: relay does not know session {sid}")
            if status >= 300:
                raise RelayStatusError("register", status, body)
            break
        self.registered_names = [s["name"] for s in remaining]
        self.conflicts = conflicts
        self._registered_at = asyncio.get_running_loop().time()
        self._reported_conflicts.intersection_update(conflicts)
        log.info(
            "registered %s on session %s",
            ", ".join(f"{n} ({statuses[n]})" for n in self.registered_names) or "no provider",
            sid,
        )

    async def _probe(self, sid: str, specs: Sequence[wire.ProviderSpec]) -> list[str]:
        assert self._relay is not None
        taken = []
        for spec in specs:
            status, _ = await self._relay.register(sid, [spec])
            if status == 409:
                taken.append(spec["name"])
        return taken

    async def _reregister(self) -> None:
        async with self._register_lock:
            try:
                await self._register()
            except RelayError as exc:
                log.warning("registering again failed: %s", exc)

    # --- heartbeat ----------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        """Heartbeat on the announced interval, independent of task load."""
        while True:
            interval = self._heartbeat_interval
            if interval is None or self.session_id is None:
                await self._heartbeat_kick.wait()
                self._heartbeat_kick.clear()
                continue
            try:
                async with asyncio.timeout(interval):
                    await self._heartbeat_kick.wait()
                self._heartbeat_kick.clear()
                continue  # new session or interval: restart the wait
            except TimeoutError:
                pass
            await self.heartbeat()


def _json(event: SSEEvent) -> dict[str, Any] | None:
    try:
        data = orjson.loads(event.data)
    except orjson.JSONDecodeError:
        log.warning("relay %s event is not JSON: %.200r", event.event, event.data)
        return None
    if not isinstance(data, dict):
        log.warning("relay %s event is not a JSON object: %.200r", event.event, event.data)
        return None
    return data


def _detail(body: object) -> str:
    """The human part of a relay error answer."""
    if isinstance(body, dict):
        for key in ("detail", "message", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                value = value.get("message")
            if isinstance(value, str):
                return value[:300]
    return str(body)[:300]


def _mentioned(body: object, names: Sequence[str]) -> list[str]:
    """Provider names a 409 answer names (as a value, or quoted in a message)."""
    texts: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, Mapping):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(body)
    found = []
    for name in names:
        quoted = (f'"{name}"', f"'{name}'", f"`{name}`")
        if any(t == name or any(q in t for q in quoted) for t in texts):
            found.append(name)
    return found
