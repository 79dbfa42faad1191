"""Tasks that reach a replica for a publisher session it no longer holds.

A session moves between replicas: on SIGTERM a replica asks its publishers
to reconnect elsewhere (``event: reconnect``); a publisher whose connection
broke resumes wherever the load balancer sends it, and the new channel
takes the session over. Until the new binding is recorded, the session still
names the old replica, whose inbox reader still runs: a task routed in that
window (by any replica) arrives there and finds no channel. Failing it would
fail requests in every rolling restart and every reconnect, so the old
replica holds it instead, and forwards it to the new replica's inbox as soon
as the session is bound there: at once if it already is, on the ``close``
message the new binding sends here, or at the latest on the next periodic
check. A task still held after ``HANDOFF_SECONDS`` (the publisher did not
come back), or whose session ended, fails as before.

The consumer's side is untouched: its request waits where it is, and the
publisher's chunks and result reach it through the consumer replica's inbox
as for any task. A task the consumer cancelled meanwhile (its task key is
gone) is not forwarded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis

from relay.keys import Keys

log = logging.getLogger("relay.handoff")

# How long a held task waits for its publisher to resume on another replica.
# The agent reconnects at once on ``reconnect``; this covers a slow network
# and a load balancer that first sends it back here (refused while draining).
HANDOFF_SECONDS = 15.0
# How often a held task checks the session's binding, should the ``close``
# message that announces the move be late or lost.
CHECK_SECONDS = 0.25

# Forward held tasks once the session is bound to another live replica.
# KEYS[1] session. ARGV: tag, selfReplica, inboxMaxlen, sessionId, then per
# task: taskId, consumerReplica, payload.
# Returns {'wait'}, {'gone'} (the session ended or expired: its tasks fail)
# or {'sent', replica, count}.
_FORWARD = """
local replica = redis.call('HGET', KEYS[1], 'replica')
if (not replica) or replica == '' then return {'gone'} end
if replica == ARGV[2] then return {'wait'} end
local tag = ARGV[1]
if redis.call('EXISTS', tag .. ':replica:' .. replica) == 0 then return {'wait'} end
local sent = 0
for i = 5, #ARGV, 3 do
  if redis.call('EXISTS', tag .. ':task:' .. ARGV[i]) == 1 then
    redis.call('XADD', tag .. ':inbox:' .. replica, 'MAXLEN', '~', ARGV[3], '*',
      'k', 'task', 's', ARGV[4], 't', ARGV[i], 'r', ARGV[i + 1], 'd', ARGV[i + 2])
    sent = sent + 1
  end
end
return {'sent', replica, sent}
"""

Fail = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Held:
    task_id: str
    consumer: str  # the replica where the consumer waits
    payload: bytes  # the task event's data, as routed


class Handoff:
    """Held tasks per released session, and one forwarder task per session."""

    def __init__(self, redis: Redis, keys: Keys, replica_id: str, inbox_maxlen: int, fail: Fail):
        self._keys = keys
        self._replica_id = replica_id
        self._inbox_maxlen = inbox_maxlen
        self._fail = fail
        self._forward = redis.register_script(_FORWARD)
        self._held: dict[str, list[_Held]] = {}
        self._moved: dict[str, asyncio.Event] = {}
        self._forwarders: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    @property
    def held(self) -> int:
        """Tasks held right now, over all sessions."""
        return sum(len(tasks) for tasks in self._held.values())

    def hold(self, session_id: str, task_id: str, payload: bytes, consumer: str) -> bool:
        """Hold a task for a session this replica does not hold, until it can
        go where the session is; False once shutting down (the caller fails
        the task as undeliverable)."""
        if self._closing:
            return False
        self._held.setdefault(session_id, []).append(_Held(task_id, consumer, payload))
        if session_id not in self._forwarders:
            self._moved.setdefault(session_id, asyncio.Event())
            self._forwarders[session_id] = asyncio.create_task(
                self._run(session_id), name=f"handoff {session_id}"
            )
        log.info(
            "task %s held: session %s is not here, forwarding it where it is", task_id, session_id
        )
        return True

    def moved(self, session_id: str) -> None:
        """The session was bound elsewhere (its ``close`` message): forward now."""
        event = self._moved.get(session_id)
        if event is not None:
            event.set()

    async def close(self) -> None:
        """Shutdown: stop waiting; what is still held fails (503)."""
        self._closing = True
        for event in self._moved.values():
            event.set()
        if self._forwarders:
            await asyncio.wait(list(self._forwarders.values()), timeout=5)

    async def _run(self, session_id: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOFF_SECONDS
        event = self._moved[session_id]
        try:
            while not self._closing:
                event.clear()
                batch = self._held.pop(session_id, [])
                if not batch:
                    return
                try:
                    outcome = await self._try(session_id, batch)
                except Exception as exc:  # Redis failing over: keep holding, retry
                    log.warning("handoff of session %s: %s; retrying", session_id, exc)
                    outcome = "wait"
                if outcome == "sent":
                    continue
                if outcome == "gone":
                    for held in batch:  # a no-op for tasks the session's end failed already
                        await self._fail(held.task_id, session_id)
                    continue
                self._held[session_id] = batch + self._held.get(session_id, [])
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                try:
                    await asyncio.wait_for(event.wait(), min(CHECK_SECONDS, remaining))
                except TimeoutError:
                    pass
        finally:
            del self._forwarders[session_id]
            left = self._held.pop(session_id, [])
            if left:
                log.warning(
                    "session %s did not resume on another replica within %g s: "
                    "%d held task(s) fail",
                    session_id,
                    HANDOFF_SECONDS,
                    len(left),
                )
            for held in left:
                try:
                    await self._fail(held.task_id, session_id)
                except Exception as exc:
                    log.warning("task %s: could not fail it: %s", held.task_id, exc)

    async def _try(self, session_id: str, batch: list[_Held]) -> str:
        args: list[str | bytes | int] = [
            self._keys.tag,
            self._replica_id,
            self._inbox_maxlen,
            session_id,
        ]
        for held in batch:
            args += [held.task_id, held.consumer, held.payload]
        res = await self._forward(keys=[self._keys.session(session_id)], args=args)
        outcome = _s(res[0])
        if outcome == "sent":
            log.info(
                "session %s resumed on replica %s: %d held task(s) forwarded there (%d cancelled)",
                session_id,
                _s(res[1]),
                int(res[2]),
                len(batch) - int(res[2]),
            )
        elif outcome == "gone":
            log.info(
                "session %s ended while %d task(s) were held for it: they fail",
                session_id,
                len(batch),
            )
        return outcome


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
