"""The Llm row state machine: what may happen to a row, decided without I/O.

Every function here takes the current row (the decoded Redis hash, or None)
and returns the fields to write, or raises ``Conflict``. The store applies
the decision atomically (WATCH/MULTI); the functions themselves are pure, so
the rules can be read and tested on their own.

Row fields: name, kind, type, model, description, status, principal,
providerSessionId, lastHeartbeatAt, inactiveSince, createdAt, updatedAt, and
for public rows url and apiKey. Times are epoch seconds as decimal strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from relay.wire import ACTIVE, HIBERNATING, INACTIVE, PUBLIC, VIRTUAL, ProviderSpec

Row = dict[str, str]


@dataclass(frozen=True)
class Lifecycle:
    """Every lifecycle duration, in seconds, in one place."""

    heartbeat_timeout: float = 90.0
    inactive_retention: float = 4 * 3600.0
    task_timeout: float = 300.0
    wake_timeout: float = 600.0


class Conflict(Exception):
    """The change is refused; nothing is written. ``status`` is the HTTP code."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _ts(now: float) -> str:
    return f"{now:.3f}"


def plan_register(
    row: Row | None, spec: ProviderSpec, session_id: str, principal: str, now: float
) -> Row:
    """Fields to write so that ``spec`` is served by ``session_id``.

    Insert a new name; reactivate a row of the same session in place; adopt an
    inactive row of another session of the same principal (sticky reconnect).
    Refuse a public row, another principal's row, or a row another session
    still serves.
    """
    initial = spec.get("initialStatus", ACTIVE)
    fields: Row = {
        "name": spec["name"],
        "kind": VIRTUAL,
        "type": spec["type"],
        "model": spec["model"],
        "description": spec.get("description", ""),
        "status": initial,
        "principal": principal,
        "providerSessionId": session_id,
        "lastHeartbeatAt": _ts(now),
        "inactiveSince": "",
        "updatedAt": _ts(now),
        "wakeMaxWaitSeconds": str(spec.get("wakeMaxWaitSeconds", "")),
    }
    if row is None:
        return {**fields, "createdAt": _ts(now)}
    name = spec["name"]
    if row.get("kind") == PUBLIC:
        raise Conflict(f"Llm {name!r} is a public row managed by an admin; pick another name")
    if row.get("principal") != principal:
        raise Conflict(f"Llm {name!r} is published by another principal; pick another name")
    owner = row.get("providerSessionId")
    if owner != session_id and row.get("status") != INACTIVE:
        raise Conflict(
            f"Llm {name!r} is served by another live session ({owner}); stop that "
            "publisher or pick another name"
        )
    return fields


def plan_heartbeat(row: Row, now: float) -> Row:
    """Bump the heartbeat; an inactive row comes back to active, a hibernating
    row stays hibernating (only a wake makes it active)."""
    fields: Row = {"lastHeartbeatAt": _ts(now)}
    if row.get("status") == INACTIVE:
        fields.update(status=ACTIVE, inactiveSince="", updatedAt=_ts(now))
    return fields


def plan_deactivate(row: Row, now: float) -> Row | None:
    """The session is gone (disconnect or silence): its live rows go inactive."""
    if row.get("kind") != VIRTUAL or row.get("status") == INACTIVE:
        return None
    return {"status": INACTIVE, "inactiveSince": _ts(now), "updatedAt": _ts(now)}


def plan_woken(row: Row, now: float) -> Row | None:
    """A wake succeeded: a hibernating row becomes active."""
    if row.get("status") != HIBERNATING:
        return None
    return {"status": ACTIVE, "lastHeartbeatAt": _ts(now), "updatedAt": _ts(now)}


SweepAction = Literal["deactivate", "delete"]


def plan_sweep(row: Row, now: float, lc: Lifecycle) -> SweepAction | None:
    """What housekeeping does to a row: silent live rows go inactive, rows
    inactive past the retention are deleted. Public rows are never swept."""
    if row.get("kind") != VIRTUAL:
        return None
    status = row.get("status")
    if status == INACTIVE:
        since = _float(row.get("inactiveSince")) or _float(row.get("updatedAt"))
        return "delete" if now - since >= lc.inactive_retention else None
    if now - _float(row.get("lastHeartbeatAt")) >= lc.heartbeat_timeout:
        return "deactivate"
    return None


def row_ttl(row: Row, lc: Lifecycle) -> float:
    """How long Redis keeps a virtual row if every process dies: a live row
    outlives its heartbeat timeout plus the retention, an inactive one the
    retention. The sweep normally acts long before."""
    if row.get("status") == INACTIVE:
        return lc.inactive_retention
    return lc.heartbeat_timeout + lc.inactive_retention


def _float(value: str | None) -> float:
    try:
        return float(value) if value else 0.0
    except ValueError:
        return 0.0


TaskSweepAction = Literal["orphaned", "expired"]

# Task records outlive their timeout by this much in Redis (the store's TTL),
# so that a late answer still finds its task and is dropped cleanly.
TASK_GRACE_SECONDS = 5.0


def plan_task_sweep(
    task: Row, now: float, lc: Lifecycle, *, consumer_alive: bool
) -> TaskSweepAction | None:
    """What housekeeping does to a task record: nobody waits for its answer
    once the replica of its consumer is gone ("orphaned"), and nobody waits
    past its timeout plus the grace ("expired": a wake task has the wake
    timeout, any other the task timeout). Both are removed; the TTL normally
    does it, this covers records that lost it or a replica that crashed."""
    if not consumer_alive:
        return "orphaned"
    limit = lc.wake_timeout if task.get("kind") == "wake" else lc.task_timeout
    if now - _float(task.get("createdAt")) >= limit + TASK_GRACE_SECONDS:
        return "expired"
    return None
