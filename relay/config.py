"""Relay settings: one validated object, built once at start.

Every setting comes from a CLI flag or its ``RELAY_*`` environment variable
(flags win). A bad value, or a ``RELAY_*`` variable nobody knows (a typo such
as ``RELAY_HEARTBEAT_TIMEOUT``), stops the process at start with a message
naming it, rather than being silently ignored in production.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from relay.lifecycle import Lifecycle

# Variables read by other parts of the project (the publisher agent, the
# worker): known, so not reported as typos.
_OTHER_KNOWN_ENV = {
    "RELAY_URL",
    "RELAY_TOKEN",
    "RELAY_GC_INTERVAL_SECONDS",
    "RELAY_LOG_LEVEL",
}


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseSettings):
    """Settings of one relay replica."""

    model_config = SettingsConfigDict(env_prefix="RELAY_", extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    redis_url: str | None = None
    redis_sentinels: str | None = None
    redis_master_name: str | None = None
    redis_prefix: str = "relay"
    replica_id: str = Field(default_factory=lambda: secrets.token_hex(4))
    tokens_file: str | None = None
    tokens: str | None = None
    no_auth: bool = False
    heartbeat_timeout_seconds: float = Field(90.0, gt=0)
    heartbeat_interval_seconds: int = Field(30, gt=0)
    inactive_retention_seconds: float = Field(14400.0, gt=0)
    task_timeout_seconds: float = Field(300.0, gt=0)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    inbox_maxlen: int = Field(100_000, ge=1000)
    wake_timeout_seconds: float = Field(600.0, gt=0)
    wake_max_waiters: int = Field(1000, gt=0)
    gc_interval_seconds: float = Field(15.0, gt=0)
    log_level: str = "INFO"
    demo: bool = False

    @field_validator("redis_prefix")
    @classmethod
    def _prefix_has_no_braces(cls, v: str) -> str:
        if not v or "{" in v or "}" in v:
            raise ValueError("must be non-empty and contain no braces (it becomes a hash tag)")
        return v

    @field_validator("replica_id")
    @classmethod
    def _replica_id_plain(cls, v: str) -> str:
        if not v or any(c in v for c in "{}: \t"):
            raise ValueError("must be non-empty, without spaces, colons or braces")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return v.upper()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.redis_sentinels and not self.redis_master_name:
            raise ValueError("RELAY_REDIS_MASTER_NAME is required with RELAY_REDIS_SENTINELS")
        if self.heartbeat_interval_seconds * 2 > self.heartbeat_timeout_seconds:
            raise ValueError(
                "RELAY_HEARTBEAT_INTERVAL_SECONDS must be at most half of "
                "RELAY_HEARTBEAT_TIMEOUT_SECONDS, or one late heartbeat marks rows inactive"
            )
        return self

    @property
    def embedded(self) -> bool:
        """No Redis configured: run single-replica on an in-process store."""
        return not self.redis_url and not self.redis_sentinels

    @property
    def lifecycle(self) -> Lifecycle:
        return Lifecycle(
            heartbeat_timeout=self.heartbeat_timeout_seconds,
            inactive_retention=self.inactive_retention_seconds,
            task_timeout=self.task_timeout_seconds,
            wake_timeout=self.wake_timeout_seconds,
        )


def _unknown_env(environ: Mapping[str, str]) -> list[str]:
    known = {f"RELAY_{name.upper()}" for name in Settings.model_fields} | _OTHER_KNOWN_ENV
    return sorted(k for k in environ if k.startswith("RELAY_") and k not in known)


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from the environment plus explicit overrides (CLI flags).

    Raises ConfigError naming the offending setting.
    """
    env = os.environ if environ is None else environ
    unknown = _unknown_env(env)
    if unknown:
        raise ConfigError(
            f"unknown setting {', '.join(unknown)}: check the spelling "
            "(the README lists every RELAY_* variable)"
        )
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    try:
        if environ is None:
            return Settings(**given)
        # An explicit environment (tests): read it instead of os.environ.
        from_env = {
            name: env[f"RELAY_{name.upper()}"]
            for name in Settings.model_fields
            if f"RELAY_{name.upper()}" in env
        }
        return Settings.model_validate({**from_env, **given})
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        name = f"RELAY_{loc.upper()}" if loc else "settings"
        value = err.get("input")
        shown = "" if loc in {"tokens"} or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"invalid setting {name}{shown}: {err['msg']}")
    return "; ".join(lines)
