"""The row state machine on its own: no Redis, no clock."""

from __future__ import annotations

import pytest

from relay.lifecycle import (
    Conflict,
    Lifecycle,
    plan_deactivate,
    plan_heartbeat,
    plan_register,
    plan_sweep,
    plan_woken,
)
from relay.wire import ProviderSpec

SPEC: ProviderSpec = {"name": "llama", "type": "openai", "model": "llama3"}
LC = Lifecycle(heartbeat_timeout=90, inactive_retention=4 * 3600)


def row(**fields: str) -> dict[str, str]:
    base = {
        "name": "llama",
        "kind": "virtual",
        "status": "active",
        "principal": "alice",
        "providerSessionId": "s1",
        "lastHeartbeatAt": "1000.000",
        "createdAt": "1.000",
    }
    return {**base, **fields}


def test_new_name_inserts_active_virtual_row() -> None:
    plan = plan_register(None, SPEC, "s1", "alice", 1000.0)
    assert plan["kind"] == "virtual" and plan["status"] == "active"
    assert plan["providerSessionId"] == "s1" and plan["createdAt"] == "1000.000"


def test_initial_status_hibernating_is_kept() -> None:
    spec: ProviderSpec = {**SPEC, "initialStatus": "hibernating"}
    assert plan_register(None, spec, "s1", "alice", 1.0)["status"] == "hibernating"


def test_same_session_reactivates_in_place_keeping_created_at() -> None:
    plan = plan_register(row(status="inactive"), SPEC, "s1", "alice", 2000.0)
    assert plan["status"] == "active" and "createdAt" not in plan


def test_inactive_row_of_same_principal_is_adopted() -> None:
    plan = plan_register(row(status="inactive"), SPEC, "s2", "alice", 2000.0)
    assert plan["providerSessionId"] == "s2"


@pytest.mark.parametrize("status", ["active", "hibernating"])
def test_live_row_of_another_session_is_refused(status: str) -> None:
    with pytest.raises(Conflict, match="another live session"):
        plan_register(row(status=status), SPEC, "s2", "alice", 2000.0)


def test_row_of_another_principal_is_refused_even_inactive() -> None:
    with pytest.raises(Conflict, match="another principal"):
        plan_register(row(status="inactive"), SPEC, "s2", "bob", 2000.0)


def test_public_row_is_never_overwritten() -> None:
    with pytest.raises(Conflict, match="public"):
        plan_register(row(kind="public", principal=""), SPEC, "s1", "alice", 2000.0)


def test_heartbeat_revives_inactive_but_not_hibernating() -> None:
    assert plan_heartbeat(row(status="inactive"), 5.0)["status"] == "active"
    assert "status" not in plan_heartbeat(row(status="hibernating"), 5.0)
    assert plan_heartbeat(row(), 5.0) == {"lastHeartbeatAt": "5.000"}


def test_deactivate_only_live_virtual_rows() -> None:
    assert plan_deactivate(row(), 7.0) == {
        "status": "inactive",
        "inactiveSince": "7.000",
        "updatedAt": "7.000",
    }
    assert plan_deactivate(row(status="inactive"), 7.0) is None
    assert plan_deactivate(row(kind="public"), 7.0) is None


def test_woken_only_from_hibernating() -> None:
    assert plan_woken(row(status="hibernating"), 3.0) == {
        "status": "active",
        "lastHeartbeatAt": "3.000",
        "updatedAt": "3.000",
    }
    assert plan_woken(row(), 3.0) is None


def test_sweep_thresholds() -> None:
    assert plan_sweep(row(), 1000.0 + 89.9, LC) is None
    assert plan_sweep(row(), 1000.0 + 90, LC) == "deactivate"
    assert plan_sweep(row(status="hibernating"), 1000.0 + 90, LC) == "deactivate"
    old = row(status="inactive", inactiveSince="1000.000")
    assert plan_sweep(old, 1000.0 + 4 * 3600 - 1, LC) is None
    assert plan_sweep(old, 1000.0 + 4 * 3600, LC) == "delete"
    assert plan_sweep(row(kind="public"), 1e12, LC) is None
