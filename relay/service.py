"""The relay service: what one replica does with a request.

It owns this replica's live state (the publisher channels it holds, the
consumer requests waiting here, its inbox reader) and decides, per request,
where work goes: to a local channel, to another replica's inbox, to a public
upstream, or back as an error. Row rules live in ``relay.lifecycle``; Redis
I/O in ``relay.store``; HTTP in ``relay.api``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import orjson
from starlette.types import Receive

from relay import wire
from relay.auth import Principal
from relay.bus import Inbox, Message
from relay.config import Settings
from relay.connections import Clients
from relay.errors import RelayError, error_body, status_type
from relay.handoff import Handoff
from relay.keys import Keys
from relay.lifecycle import Conflict
from relay.metrics import Metrics
from relay.sessions import Channel, Sessions
from relay.store import Forbidden, NotFound, Route, Store
from relay.tasks import Item, Pending, PendingTasks
from relay.wake import Waker

log = logging.getLogger("relay.service")

Clock = Callable[[], float]

LIVENESS_TTL = 15.0
LIVENESS_EVERY = 5.0
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_DONE = b"data: [DONE]\n\n"
_KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_SECONDS = 15.0
WAKE_COMMENT_SECONDS = 5.0
# A plain request not answered by then starts watching for its consumer to
# hang up (relay.service.Relay.result).
HANG_UP_WATCH_AFTER_SECONDS = 0.5
READY_PING_SECONDS = 1.0


def new_id() -> str:
    return secrets.token_urlsafe(16)


class Relay:
    def __init__(
        self,
        settings: Settings,
        clients: Clients,
        *,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.replica_id = settings.replica_id
        self.clock = clock
        self.clients = clients
        self.keys = Keys(settings.redis_prefix)
        self.store = Store(
            clients.commands, self.keys, settings.lifecycle, inbox_maxlen=settings.inbox_maxlen
        )
        self.sessions = Sessions()
        self.pending = PendingTasks()
        self.inbox = Inbox(clients.blocking, self.keys.inbox(self.replica_id), self._on_message)
        self.waker = Waker(self)
        self.draining = False
        # Tasks for sessions that moved to another replica (relay.handoff).
        self.handoff = Handoff(
            clients.commands, self.keys, self.replica_id, settings.inbox_maxlen, self._undeliverable
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.metrics = Metrics()
        self.metrics.watch(
            {
                "relay_sessions_held": (
                    "Publisher channels held here.",
                    lambda: len(self.sessions),
                ),
                "relay_tasks_waiting": (
                    "Consumer requests waiting here.",
                    lambda: len(self.pending),
                ),
                "relay_inbox_healthy": (
                    "1 while the inbox reader works.",
                    lambda: self.inbox.healthy,
                ),
                "relay_draining": ("1 once SIGTERM began the drain.", lambda: self.draining),
                "relay_handoff_held": (
                    "Tasks held here for sessions that moved to another replica.",
                    lambda: self.handoff.held,
                ),
            }
        )
        self._answered = self.metrics.tasks.labels("answered")
        self._abandoned = self.metrics.tasks.labels("abandoned")

    # --- lifecycle of the replica -------------------------------------------
    async def start(self) -> None:
        await self.store.replica_alive(self.replica_id, LIVENESS_TTL, self.clock())
        await self.inbox.start()
        self._loops.append(asyncio.create_task(self._liveness_loop(), name="liveness"))
        log.info(
            "replica %s up (%s store)",
            self.replica_id,
            "embedded in-process" if self.clients.embedded else "shared Redis",
        )

    async def stop(self) -> None:
        self.draining = True
        for ch in self.sessions.all():
            ch.close()
        await self.handoff.close()
        for loop in self._loops:
            loop.cancel()
        await self.inbox.stop()
        if self._background:
            await asyncio.wait(self._background, timeout=5)
        try:
            await self.store.replica_gone(self.replica_id)
        except Exception as exc:  # Redis gone at shutdown: the worker cleans up
            log.warning("could not deregister replica %s: %s", self.replica_id, exc)
        await self.store.aclose()
        log.info("replica %s stopped", self.replica_id)

    def begin_drain(self) -> None:
        """SIGTERM: stop taking publishers, ask the connected ones to resume on
        another replica (their rows stay active), and let /readyz fail so the
        load balancer stops sending consumers. Requests in flight finish."""
        if self.draining:
            return
        self.draining = True
        channels = self.sessions.all()
        for ch in channels:
            self._release(ch)
        log.info(
            "replica %s draining: %d publisher(s) asked to reconnect elsewhere, %d request(s) in flight",
            self.replica_id,
            len(channels),
            len(self.pending),
        )

    def _release(self, ch: Channel) -> None:
        """Draining: ask the channel's publisher to resume on another replica,
        keep its rows, and hold tasks for it until it did (relay.handoff)."""
        ch.send_json(wire.EVENT_RECONNECT, {})
        ch.close(taken_over=True, reason="replica draining, publisher asked to reconnect")

    async def ready(self) -> bool:
        """Not draining, the inbox reader connected and current, and Redis
        answering a PING within a second (a probe must not wait out a failover)."""
        if self.draining or not self.inbox.healthy:
            return False
        try:
            async with asyncio.timeout(READY_PING_SECONDS):
                await self.clients.commands.ping()
        except Exception:
            return False
        return True

    async def _liveness_loop(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_EVERY)
            try:
                await self.store.replica_alive(self.replica_id, LIVENESS_TTL, self.clock())
            except Exception as exc:
                log.warning("replica liveness update failed: %s", exc)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` detached from the request (whose scope may be cancelled)."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- publisher sessions ---------------------------------------------------
    async def open_channel(self, principal: Principal, resume: str | None) -> Channel:
        if resume is not None and not _SESSION_ID.match(resume):
            raise RelayError(400, "sessionId must be 8 to 64 URL-safe characters", "bad_session_id")
        if self.draining:
            raise RelayError(
                503,
                "this replica is draining; connect again",
                "draining",
                headers={"Retry-After": "1"},
            )
        sid = resume or new_id()
        channel = Channel(sid, principal.name)
        try:
            old_replica, _ = await self.store.bind(
                sid, principal.name, self.replica_id, channel.channel_id, self.clock()
            )
        except Forbidden as exc:
            raise RelayError(403, str(exc), "session_forbidden") from None
        replaced = self.sessions.add(channel)
        if replaced is not None:
            replaced.close(taken_over=True, reason="resumed on a newer channel")
        channel.send_json(
            wire.EVENT_SESSION,
            {
                "sessionId": sid,
                "heartbeatIntervalSeconds": self.settings.heartbeat_interval_seconds,
            },
        )
        how = "resumed" if resume else "opened"
        if old_replica:
            how = f"taken over from replica {old_replica}"
        if old_replica and old_replica != self.replica_id:
            stranded = await self.store.stranded_tasks(sid, old_replica)
            for _task_id, payload in stranded:
                channel.send(wire.EVENT_TASK, payload)
            if stranded:
                how += f", which died: {len(stranded)} task(s) it never delivered sent again"
        log.info("session %s %s by %s on replica %s", sid, how, principal.name, self.replica_id)
        self.metrics.sessions_opened.inc()
        if self.draining:  # the drain began while this channel was being bound
            self._release(channel)
        return channel

    async def close_channel(self, channel: Channel) -> None:
        """The SSE connection ended. Unless a newer channel took the session
        over, its rows go inactive and its in-flight tasks fail everywhere."""
        self.sessions.discard(channel)
        self.metrics.sessions_closed.labels("kept" if channel.taken_over else "deactivated").inc()
        if channel.taken_over:
            log.info("session %s: channel closed (%s)", channel.session_id, channel.close_reason)
            return
        orphans = await self.store.unbind(channel.session_id, channel.channel_id, self.clock())
        log.info(
            "session %s disconnected: rows inactive, %d in-flight task(s) failed",
            channel.session_id,
            len(orphans),
        )

    async def register(
        self, principal: Principal, sid: str, providers: list[wire.ProviderSpec]
    ) -> list[dict[str, str]]:
        try:
            rows = await self.store.register(sid, principal.name, providers, self.clock())
        except NotFound as exc:
            raise RelayError(404, str(exc), "session_not_found") from None
        except Forbidden as exc:
            raise RelayError(403, str(exc), "session_forbidden") from None
        except Conflict as exc:
            raise RelayError(exc.status, exc.message, "name_conflict") from None
        log.info(
            "session %s registered %s",
            sid,
            ", ".join(f"{r['name']} ({r['status']})" for r in rows),
        )
        return rows

    async def heartbeat(self, principal: Principal, sid: str) -> list[str]:
        try:
            return await self.store.heartbeat(sid, principal.name, self.clock())
        except NotFound as exc:
            raise RelayError(404, str(exc), "session_not_found") from None
        except Forbidden as exc:
            raise RelayError(403, str(exc), "session_forbidden") from None

    # --- task posts from publishers -----------------------------------------------
    async def post_chunks(
        self, principal: Principal, sid: str, task_id: str, raw: bytes, *, ordered: bool
    ) -> None:
        """A chunk batch. When the consumer waits here it skips Redis, but only
        if the batch carries its offset: it may overtake an earlier batch still
        in the inbox, and the offset lets the consumer put it back in order."""
        local = self.pending.get(task_id)
        if (
            ordered
            and local is not None
            and local.session_id == sid
            and local.principal == principal.name
        ):
            local.put(Item("chunks", raw))
            return
        await self._post(principal, sid, task_id, "chunks", raw, final=False, via_inbox=not ordered)

    async def post_result(self, principal: Principal, sid: str, task_id: str, raw: bytes) -> None:
        """A task's final answer. A stream's end always goes through the
        consumer's inbox, even when the consumer waits here: earlier chunk
        batches posted through other replicas are in that stream before it,
        so the end cannot overtake them."""
        local = self.pending.get(task_id)
        via_inbox = local is not None and local.stream
        await self._post(principal, sid, task_id, "result", raw, final=True, via_inbox=via_inbox)

    async def _post(
        self,
        principal: Principal,
        sid: str,
        task_id: str,
        kind: str,
        raw: bytes,
        *,
        final: bool,
        via_inbox: bool,
    ) -> None:
        try:
            where = await self.store.post(
                task_id,
                sid,
                principal.name,
                self.replica_id,
                kind,
                raw,
                final=final,
                via_inbox=via_inbox,
            )
        except NotFound as exc:
            raise RelayError(404, str(exc), "task_not_found") from None
        except Forbidden as exc:
            raise RelayError(403, str(exc), "task_forbidden") from None
        if where == self.replica_id and not via_inbox:
            self.pending.deliver(task_id, Item("chunks" if kind == "chunks" else "result", raw))

    # --- consumer requests ----------------------------------------------------------
    async def submit(self, name: str, path: str, raw: bytes, stream: bool) -> Pending | Route:
        """Route a consumer request. Returns the pending task to wait on, or a
        Route: a public row's, for the caller to proxy, or a hibernating row's,
        for the caller to wake (``awaken``) first."""
        task_id = new_id()
        pending = Pending(
            task_id,
            name,
            stream,
            deadline=asyncio.get_running_loop().time() + self.settings.task_timeout_seconds,
        )
        self.pending.add(pending)  # before routing: a fast answer must find it
        payload = b"".join(
            (
                b'{"kind":"infer","taskId":"',
                task_id.encode(),
                b'","llmName":',
                orjson.dumps(name),
                b',"path":"',
                path.encode(),
                b'","stream":',
                b"true" if stream else b"false",
                b',"body":',
                raw,
                b"}",
            )
        )
        try:
            route = await self.store.route(name, task_id, self.replica_id, self.clock(), payload)
        except BaseException:
            self.pending.pop(task_id)
            raise
        self.metrics.requests.labels(route.outcome).inc()
        if route.outcome != "ok":
            self.pending.pop(task_id)
            if route.outcome in ("public", "hibernating"):
                return route
            raise self._unroutable(name, route)
        pending.session_id = route.session_id
        pending.principal = route.principal
        pending.replica = route.replica
        if route.replica == self.replica_id and not self.deliver_local(
            route.session_id, task_id, payload, self.replica_id
        ):
            self.pending.pop(task_id)
            self.spawn(self.store.cancel(task_id, self.replica_id), "cancel")
            raise RelayError(503, f"the publisher of {name!r} is offline", "provider_offline")
        return pending

    def deliver_local(self, session_id: str, task_id: str, payload: bytes, consumer: str) -> bool:
        """Push a task routed to this replica down its session's channel or,
        if the session is no longer here (a drain, a reconnect elsewhere),
        hold it and forward it where the session went (``relay.handoff``).
        False: neither (shutting down)."""
        channel = self.sessions.get(session_id)
        if channel is not None and not channel.closed:
            channel.send(wire.EVENT_TASK, payload)
            return True
        return self.handoff.hold(session_id, task_id, payload, consumer)

    async def awaken(
        self, name: str, route: Route, path: str, raw: bytes, stream: bool
    ) -> Pending | Route:
        """Wake a hibernating Llm (one wake for the whole cluster), then route
        the request. Raises 503 ``wake_failed`` with the wake's error text."""
        await self.waker.wait_awake(name, route.session_id, route.wake_seconds)
        target = await self.submit(name, path, raw, stream)
        if isinstance(target, Route) and target.outcome == "hibernating":
            raise RelayError(503, f"{name!r} went back to hibernating; retry", "wake_failed")
        return target

    async def stream_waking(
        self, name: str, waking: asyncio.Future[Pending | Route], started: float
    ) -> AsyncIterator[bytes]:
        """A stream whose Llm is still waking: SSE comments while it wakes (so
        proxies keep the connection and a person sees why), then the stream."""
        loop = asyncio.get_running_loop()
        try:
            while not waking.done():
                await asyncio.wait({waking}, timeout=WAKE_COMMENT_SECONDS)
                if not waking.done():
                    yield f": waking {name}, {loop.time() - started:.0f} s\n\n".encode()
            target = waking.result()
        except RelayError as exc:
            yield _error_event(exc.status, exc.message, exc.code)
            return
        finally:
            if not waking.done():
                waking.cancel()
        if not isinstance(target, Pending):
            yield _error_event(503, f"{name!r} cannot be streamed after waking", "wake_failed")
            return
        try:
            yield f": woke {name} in {(loop.time() - started) * 1000:.0f} ms\n\n".encode()
            async for part in self.stream(target, None):
                yield part
        finally:
            self._finish(target)  # idempotent; covers a consumer gone before the stream began

    def _unroutable(self, name: str, route: Route) -> RelayError:
        match route.outcome:
            case "unknown":
                return RelayError(404, f"The model {name!r} does not exist", "model_not_found")
            case "inactive" | "offline":
                return RelayError(
                    503,
                    f"the publisher of {name!r} is offline; try again when it reconnects",
                    "provider_offline",
                    headers={"Retry-After": "5"},
                )
            case _:
                return RelayError(500, f"unexpected route outcome {route.outcome!r}")

    async def result(self, pending: Pending, receive: Receive | None = None) -> tuple[int, bytes]:
        """Wait for a non-streaming task's answer: (status, JSON body). With
        the request's ASGI ``receive``, a consumer that hangs up cancels the
        task (the publisher aborts the backend call) instead of leaving it to
        run for nobody. Watching costs about 20 us of CPU, so it starts only
        once the answer is slow in coming: the calls worth cancelling."""
        watcher: asyncio.Task[None] | None = None
        try:
            try:
                item = await self._next(
                    pending, min(HANG_UP_WATCH_AFTER_SECONDS, self._remaining(pending))
                )
            except TimeoutError:
                if receive is not None:
                    watcher = asyncio.create_task(
                        _hang_up(receive, pending), name=f"watch {pending.task_id}"
                    )
                item = await self._wait(pending)
            while item.kind == "chunks":  # a publisher streamed a non-stream task: ignore
                item = await self._wait(pending)
            if item.kind == "fail":
                raise RelayError(item.status, item.message, _fail_code(item.status))
            if item.kind == "gone":
                raise RelayError(499, "the consumer closed the request", "client_closed")
            return self._decode_result(pending, item.payload)
        finally:
            if watcher is not None:
                watcher.cancel()
            self._finish(pending)

    async def first(self, pending: Pending, headstart: float) -> Item | None:
        """Wait up to ``headstart`` seconds for a streaming task's first item,
        so that an error before any chunk (offline, an upstream 4xx) still gets
        its own HTTP status. ``None``: nothing yet, start the stream anyway."""
        try:
            item = await self._next(pending, min(headstart, self._remaining(pending)))
        except TimeoutError:
            return None
        except BaseException:
            self._finish(pending)
            raise
        if item.kind == "fail":
            self._finish(pending)
            raise RelayError(item.status, item.message, _fail_code(item.status))
        if item.kind == "result":
            self._finish(pending)
            status, body = self._decode_result(pending, item.payload)
            raise _Passthrough(status, body)
        return item

    async def stream(self, pending: Pending, first: Item | None) -> AsyncIterator[bytes]:
        """The consumer's SSE body, from the first chunk batch to ``[DONE]``,
        with a keep-alive comment whenever the model is quiet for a while."""
        try:
            item = first
            while True:
                if item is None:
                    remaining = self._remaining(pending)
                    if remaining <= 0:
                        raise self._timed_out(pending)
                    try:
                        item = await self._next(pending, min(KEEPALIVE_SECONDS, remaining))
                    except TimeoutError:
                        yield _KEEPALIVE
                        continue
                if item.kind == "chunks":
                    chunks = pending.take_chunks(item.payload)
                    if chunks:
                        self.metrics.chunks.inc(len(chunks))
                        yield b"".join(b"data: " + c.encode() + b"\n\n" for c in chunks)
                elif item.kind == "fail":
                    yield _error_event(item.status, item.message)
                    return
                else:
                    rest = pending.take_rest()
                    if rest:
                        log.warning(
                            "task %s for %s: %d chunk(s) after a gap that never filled",
                            pending.task_id,
                            pending.llm,
                            len(rest),
                        )
                        yield b"".join(b"data: " + c.encode() + b"\n\n" for c in rest)
                    body = orjson.loads(item.payload)
                    if "error" in body:
                        yield _error_event(502, self._publisher_failed(pending, body["error"]))
                    elif body.get("status", 200) >= 400:
                        yield _error_event(
                            502, f"backend of {pending.llm!r} answered {body['status']} mid-stream"
                        )
                    else:
                        yield _DONE
                    return
                item = None
        except RelayError as exc:
            yield _error_event(exc.status, exc.message)
        finally:
            self._finish(pending)

    def _remaining(self, pending: Pending) -> float:
        return pending.deadline - asyncio.get_running_loop().time()

    def _timed_out(self, pending: Pending) -> RelayError:
        pending.timed_out = True
        return RelayError(
            504,
            f"{pending.llm!r} gave no answer within {self.settings.task_timeout_seconds:g} s",
            "timeout",
        )

    async def _wait(self, pending: Pending) -> Item:
        """The next item within the task's deadline, or a 504."""
        try:
            return await self._next(pending, self._remaining(pending))
        except TimeoutError:
            raise self._timed_out(pending) from None

    async def _next(self, pending: Pending, timeout: float) -> Item:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the
        # get in a task of its own, once per request and per chunk batch.
        queue = pending.queue
        if queue.empty():
            async with asyncio.timeout(max(timeout, 0)):
                item = await queue.get()
        else:
            item = queue.get_nowait()
        if item.kind == "result" or item.kind == "fail":
            pending.answered = True
        return item

    def _decode_result(self, pending: Pending, payload: bytes) -> tuple[int, bytes]:
        body = orjson.loads(payload)
        if "error" in body:
            raise RelayError(502, self._publisher_failed(pending, body["error"]), "publisher_error")
        return int(body.get("status", 200)), orjson.dumps(body.get("body"))

    def _publisher_failed(self, pending: Pending, error: object) -> str:
        message = f"the publisher of {pending.llm!r} failed: {error}"
        log.warning("task %s (session %s): %s", pending.task_id, pending.session_id, message)
        return message

    def _finish(self, pending: Pending) -> None:
        """The consumer is done with a task, answered or not. If no final
        answer came, tell the publisher to stop and forget the task."""
        if self.pending.pop(pending.task_id) is None:
            return
        (self._answered if pending.answered else self._abandoned).inc()
        if not pending.answered:
            self.spawn(self._cancel(pending), f"cancel {pending.task_id}")

    async def _cancel(self, pending: Pending) -> None:
        where, sid = await self.store.cancel(pending.task_id, self.replica_id)
        if where == "local":
            channel = self.sessions.get(sid)
            if channel is not None:
                channel.send_json(wire.EVENT_CANCEL, {"taskId": pending.task_id})
        if pending.timed_out:
            log.warning(
                "task %s for %s timed out after %g s (session %s): consumer answered 504, "
                "publisher told to stop",
                pending.task_id,
                pending.llm,
                self.settings.task_timeout_seconds,
                pending.session_id,
            )
        elif where != "none":
            log.info(
                "task %s for %s cancelled (session %s): the consumer went away",
                pending.task_id,
                pending.llm,
                pending.session_id,
            )

    # --- inbox ------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        kind = msg[b"k"]
        if kind in (b"chunks", b"result"):
            self.pending.deliver(msg[b"t"].decode(), Item(kind.decode(), msg[b"d"]))  # type: ignore[arg-type]
        elif kind == b"fail":
            self.pending.deliver(
                msg[b"t"].decode(), Item("fail", status=int(msg[b"c"]), message=msg[b"d"].decode())
            )
        elif kind == b"task":
            if not self.deliver_local(
                msg[b"s"].decode(), msg[b"t"].decode(), msg[b"d"], msg.get(b"r", b"").decode()
            ):
                self.spawn(
                    self._undeliverable(msg[b"t"].decode(), msg[b"s"].decode()), "undeliverable"
                )
        elif kind == b"cancel":
            channel = self.sessions.get(msg[b"s"].decode())
            if channel is not None:
                channel.send_json(wire.EVENT_CANCEL, {"taskId": msg[b"t"].decode()})
        elif kind == b"wake":
            self.waker.on_message(msg[b"n"].decode(), msg[b"ok"] == b"1", msg[b"d"].decode())
        elif kind == b"close":
            channel = self.sessions.find(msg[b"s"].decode(), msg[b"c"].decode())
            if channel is not None:
                channel.close(taken_over=True, reason="resumed on another replica")
            self.handoff.moved(msg[b"s"].decode())
        else:
            log.warning("inbox: unknown message kind %r", kind)

    async def _undeliverable(self, task_id: str, sid: str) -> None:
        """A task reached this replica after its session left: fail it back."""
        failed = await self.store.fail_task(
            task_id, 503, "the publisher disconnected before the task reached it", self.replica_id
        )
        if failed == self.replica_id:
            self.pending.deliver(
                task_id, Item("fail", status=503, message="the publisher disconnected")
            )
        log.info("task %s for session %s undeliverable: session not held here", task_id, sid)


async def _hang_up(receive: Receive, pending: Pending) -> None:
    """Wait for the consumer's disconnect (its body was read already), then
    tell the task's waiter."""
    while (await receive())["type"] != "http.disconnect":
        pass
    pending.put(Item("gone"))


class _Passthrough(Exception):
    """A streaming request answered without a stream (an upstream error, say):
    the API passes the status and body through as a plain response."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


Passthrough = _Passthrough


def _fail_code(status: int) -> str:
    return {502: "publisher_disconnected", 503: "provider_offline", 504: "timeout"}.get(
        status, "relay_error"
    )


def _error_event(status: int, message: str, code: str | None = None) -> bytes:
    body = error_body(message, status_type(status), code or _fail_code(status))
    return b"data: " + body + b"\n\n"
