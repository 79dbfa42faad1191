"""Waking hibernating Llms: one wake per Llm across every replica.

Requests for a hibernating row wait here. Per replica, one future per Llm
stands for "the current wake", however many requests wait on it. Across
replicas, a Redis ``SET NX`` lock elects the replica that sends the wake task
(through the same routing as infer tasks) and waits for its result; it then
releases the lock and tells every live replica's inbox how the wake ended,
so their waiters proceed or fail together. A counter bounds how many requests
the cluster holds for one Llm.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from relay.errors import RelayError
from relay.tasks import Pending

if TYPE_CHECKING:
    from relay.service import Relay

log = logging.getLogger("relay.wake")

# Added to the publisher's own bound (its recipe's maxWaitSeconds) for the
# round trips around it; the whole is capped by RELAY_WAKE_TIMEOUT_SECONDS.
WAKE_MARGIN_SECONDS = 15.0
DEFAULT_RECIPE_SECONDS = 60.0
# How often a replica that follows another one's wake checks that it still runs.
FOLLOW_CHECK_SECONDS = 1.0

# KEYS[1] lock. ARGV: tag, lockValue, name, ok ('1'|'0'), message, inboxMaxlen,
# selfReplica. Releases the lock if still ours, and tells every live replica
# but this one how the wake ended.
_WAKE_DONE = """
if redis.call('GET', KEYS[1]) == ARGV[2] then redis.call('DEL', KEYS[1]) end
local told = 0
for _, r in ipairs(redis.call('SMEMBERS', ARGV[1] .. ':replicas')) do
  if r ~= ARGV[7] and redis.call('EXISTS', ARGV[1] .. ':replica:' .. r) == 1 then
    redis.call('XADD', ARGV[1] .. ':inbox:' .. r, 'MAXLEN', '~', ARGV[6], '*',
      'k', 'wake', 'n', ARGV[3], 'ok', ARGV[4], 'd', ARGV[5])
    told = told + 1
  end
end
return told
"""

# KEYS[1] waiters counter. ARGV: max, ttlMs. Takes a slot, or returns 0.
_TAKE_SLOT = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return 0 end
return n
"""


@dataclass(frozen=True, slots=True)
class WakeOutcome:
    ok: bool
    message: str = ""


class Waker:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._current: dict[str, asyncio.Future[WakeOutcome]] = {}
        redis = relay.store.redis
        self._done_script = redis.register_script(_WAKE_DONE)
        self._slot_script = redis.register_script(_TAKE_SLOT)

    def deadline_for(self, recipe_seconds: str) -> float:
        try:
            recipe = float(recipe_seconds) if recipe_seconds else DEFAULT_RECIPE_SECONDS
        except ValueError:
            recipe = DEFAULT_RECIPE_SECONDS
        return min(recipe + WAKE_MARGIN_SECONDS, self.relay.settings.wake_timeout_seconds)

    async def wait_awake(self, name: str, session_id: str, recipe_seconds: str) -> None:
        """Return once ``name`` is awake; raise 503 ``wake_failed`` if the wake
        failed or timed out, 429 if too many requests already wait for it."""
        timeout = self.deadline_for(recipe_seconds)
        keys = self.relay.keys
        slot = await self._slot_script(
            keys=[keys.wake_waiters(name)],
            args=[self.relay.settings.wake_max_waiters, int((timeout + 5) * 1000)],
        )
        if not slot:
            raise RelayError(
                429,
                f"too many requests are already waiting for {name!r} to wake; retry shortly",
                "wake_queue_full",
                headers={"Retry-After": str(max(1, int(timeout / 4)))},
            )
        try:
            future = self._current.get(name)
            if future is None or future.done():
                future = asyncio.get_running_loop().create_future()
                self._current[name] = future
                self.relay.spawn(self._drive(name, session_id, timeout, future), f"wake {name}")
            outcome = await asyncio.shield(future)
        finally:
            self.relay.spawn(self.relay.store.redis.decr(keys.wake_waiters(name)), "wake slot")
        if not outcome.ok:
            raise RelayError(503, f"could not wake {name!r}: {outcome.message}", "wake_failed")

    def on_message(self, name: str, ok: bool, message: str) -> None:
        """Another replica's wake of ``name`` ended."""
        future = self._current.get(name)
        if future is not None and not future.done():
            future.set_result(WakeOutcome(ok, message))

    async def _drive(
        self, name: str, session_id: str, timeout: float, future: asyncio.Future[WakeOutcome]
    ) -> None:
        relay = self.relay
        lock = relay.keys.wake_lock(name)
        value = f"{relay.replica_id}:{secrets.token_hex(6)}"
        try:
            won = await relay.store.redis.set(lock, value, nx=True, px=int((timeout + 5) * 1000))
            if won:
                outcome = await self._wake(name, session_id, timeout)
                told = await self._done_script(
                    keys=[lock],
                    args=[
                        relay.keys.tag,
                        value,
                        name,
                        "1" if outcome.ok else "0",
                        outcome.message,
                        relay.settings.inbox_maxlen,
                        relay.replica_id,
                    ],
                )
                relay.metrics.wakes.labels("ok" if outcome.ok else "failed").inc()
                log.info(
                    "wake of %s %s (told %d other replica(s))",
                    name,
                    "succeeded" if outcome.ok else f"failed: {outcome.message}",
                    told,
                )
            else:
                outcome = await self._follow(name, lock, future)
        except Exception as exc:  # Redis down mid-wake: fail the waiters, clearly
            log.warning("wake of %s failed: %s", name, exc)
            outcome = WakeOutcome(False, f"relay error during wake: {exc}")
        if not future.done():
            future.set_result(outcome)
        if self._current.get(name) is future:
            del self._current[name]

    async def _follow(
        self, name: str, lock: str, future: asyncio.Future[WakeOutcome]
    ) -> WakeOutcome:
        """Another replica holds the lock and wakes ``name``: wait for its word
        (an inbox message). Should that word be lost, the lock's end tells:
        the script that deletes it sends the word in the same step, so once
        the lock is gone and a moment passed, the row's status is the answer."""
        redis = self.relay.store.redis
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), FOLLOW_CHECK_SECONDS)
            except TimeoutError:
                if await redis.exists(lock):
                    continue  # still waking (the lock's own expiry bounds this)
            try:
                return await asyncio.wait_for(asyncio.shield(future), FOLLOW_CHECK_SECONDS)
            except TimeoutError:
                row = await self.relay.store.get_row(name) or {}
                if row.get("status") == "active":
                    return WakeOutcome(True)
                return WakeOutcome(False, "the wake ended on another replica without a result")

    async def _wake(self, name: str, session_id: str, timeout: float) -> WakeOutcome:
        """Send the wake task to the session's replica and wait for its result."""
        relay = self.relay
        from relay.service import new_id  # circular at import time only

        task_id = new_id()
        loop = asyncio.get_running_loop()
        pending = Pending(task_id, name, False, deadline=loop.time() + timeout)
        relay.pending.add(pending)
        payload = orjson.dumps({"kind": "wake", "taskId": task_id, "llmName": name})
        log.info("waking %s: wake task %s to session %s", name, task_id, session_id)
        try:
            route = await relay.store.route(
                name, task_id, relay.replica_id, relay.clock(), payload, kind="wake", ttl=timeout
            )
            if route.outcome == "awake":
                return WakeOutcome(True)
            if route.outcome != "ok":
                return WakeOutcome(False, f"the publisher is {route.outcome}")
            pending.session_id, pending.principal, pending.replica = (
                route.session_id,
                route.principal,
                route.replica,
            )
            if route.replica == relay.replica_id and not relay.deliver_local(
                route.session_id, task_id, payload, relay.replica_id
            ):
                return WakeOutcome(False, "the publisher disconnected")
            try:
                status, body = await relay.result(pending)
            except RelayError as exc:
                return WakeOutcome(False, exc.message)
            if status >= 400:
                return WakeOutcome(
                    False, f"wake answered {status}: {body.decode(errors='replace')[:500]}"
                )
            await relay.store.mark_woken(name, relay.clock())
            return WakeOutcome(True)
        finally:
            relay.pending.pop(task_id)
