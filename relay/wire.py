"""JSON shapes and names shared by the relay and the publisher agent.

This module is the whole contract between the two halves, and the only relay
module the publisher imports, so it depends on the standard library alone.
Names here are fixed by the public HTTP contract: outside clients are written
against them, so never rename one.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

# --- Publisher-side HTTP paths (token scope ``publish``) ---------------------
SESSION_PATH = "/api/v1/providers/session"
REGISTER_PATH = "/api/v1/providers/register"
HEARTBEAT_PATH = "/api/v1/providers/heartbeat"
TASK_CHUNKS_PATH = "/api/v1/_provider-task/{task_id}/chunks"
TASK_RESULT_PATH = "/api/v1/_provider-task/{task_id}/result"
SESSION_HEADER = "X-Relay-Session"
WAKE_MS_HEADER = "X-Relay-Wake-Ms"

# --- SSE events on the publisher control channel -----------------------------
EVENT_SESSION = "session"  # first event: SessionEvent
EVENT_TASK = "task"  # InferTask | WakeTask
EVENT_CANCEL = "cancel"  # CancelEvent: the consumer went away
EVENT_RECONNECT = "reconnect"  # the replica drains: resume elsewhere, not an error

# --- Row vocabulary ----------------------------------------------------------
Status = Literal["active", "inactive", "hibernating"]
Kind = Literal["public", "virtual"]
ACTIVE: Status = "active"
INACTIVE: Status = "inactive"
HIBERNATING: Status = "hibernating"
PUBLIC: Kind = "public"
VIRTUAL: Kind = "virtual"

TASK_INFER = "infer"
TASK_WAKE = "wake"


class SessionEvent(TypedDict):
    sessionId: str
    heartbeatIntervalSeconds: int


class InferTask(TypedDict):
    kind: Literal["infer"]
    taskId: str
    llmName: str
    path: str  # "/v1/chat/completions", "/v1/completions" or "/v1/embeddings"
    body: dict[str, object]  # the consumer's body, ``model`` still the Llm name
    stream: bool


class WakeTask(TypedDict):
    kind: Literal["wake"]
    taskId: str
    llmName: str


class CancelEvent(TypedDict):
    taskId: str


class ProviderSpec(TypedDict):
    name: str
    type: str
    model: str
    description: NotRequired[str]
    initialStatus: NotRequired[Status]
    # How long the publisher's wake recipe may take; the relay's wake deadline
    # is this plus a margin, capped by RELAY_WAKE_TIMEOUT_SECONDS.
    wakeMaxWaitSeconds: NotRequired[float]


class RegisterRequest(TypedDict):
    sessionId: str
    providers: list[ProviderSpec]


class HeartbeatRequest(TypedDict):
    sessionId: str


class ChunksPost(TypedDict):
    """One batch of SSE ``data:`` payloads, in order.

    ``offset`` (optional) is the index of the first chunk of this batch within
    the task's stream. With it, a batch re-sent after a lost response is not
    delivered twice: the relay drops chunks it has already passed on.
    """

    chunks: list[str]
    offset: NotRequired[int]


class ResultPost(TypedDict, total=False):
    """``{"status", "body"}`` with the backend's answer (for a stream,
    ``{"status": 200}`` ends it), or ``{"error": "<text>"}`` on failure."""

    status: int
    body: object
    error: str


def join_url(base: str, path: str) -> str:
    """Join a backend's base URL and an OpenAI path such as
    ``/v1/chat/completions``. The base may or may not end in ``/v1`` (the
    ``openai`` SDK's ``base_url`` does, Ollama's docs' server URL does not):
    both mean the same server."""
    base = base.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path
