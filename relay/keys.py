"""The Redis key layout.

Every key carries the same hash tag, ``{<prefix>}``, so that all of them live
in one Redis Cluster hash slot and every Lua script or MULTI may touch any
of them. The prefix is configurable so that several relays can share a Redis.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.tag = "{" + prefix + "}"

    # Llm rows: one hash per name, plus the set of all names (for listing).
    def llm(self, name: str) -> str:
        return f"{self.tag}:llm:{name}"

    @property
    def llms(self) -> str:
        return f"{self.tag}:llms"

    # Sessions: a hash (principal, replica, channel, createdAt) with a TTL of
    # one heartbeat timeout, the set of row names it owns, and the set of its
    # in-flight task ids.
    def session(self, sid: str) -> str:
        return f"{self.tag}:session:{sid}"

    def session_llms(self, sid: str) -> str:
        return f"{self.tag}:session:{sid}:llms"

    def session_tasks(self, sid: str) -> str:
        return f"{self.tag}:session:{sid}:tasks"

    # Tasks: a hash (session, principal, replica where the consumer waits,
    # llm, kind, createdAt) with a TTL of the task timeout.
    def task(self, task_id: str) -> str:
        return f"{self.tag}:task:{task_id}"

    # Replicas: a liveness key with a short TTL, the set of known replica ids,
    # and each replica's inbox stream.
    def replica(self, replica_id: str) -> str:
        return f"{self.tag}:replica:{replica_id}"

    def replica_sessions(self, replica_id: str) -> str:
        """Sessions bound to a replica: what to deactivate when it dies."""
        return f"{self.tag}:replica:{replica_id}:sessions"

    @property
    def replicas(self) -> str:
        return f"{self.tag}:replicas"

    def inbox(self, replica_id: str) -> str:
        return f"{self.tag}:inbox:{replica_id}"

    # Wakes: the cluster-wide SET NX lock of one Llm's wake, and the count of
    # requests held for it.
    def wake_lock(self, name: str) -> str:
        return f"{self.tag}:wake:{name}"

    def wake_waiters(self, name: str) -> str:
        return f"{self.tag}:wake:{name}:waiters"
