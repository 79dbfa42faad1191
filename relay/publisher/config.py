"""The publisher's configuration file (``providers.yaml``) and its validation.

The whole file is checked before the agent starts: a mistake found later,
while a task is running, would surface as an obscure 502 for a consumer far
away. Every problem is reported with the file, the entry (``providers[1]
(name "llama")``) and the field, so it can be fixed without reading code.

Shape::

    relay:
      url: https://relay.example.com    # or --relay-url / RELAY_URL
      token: ...                         # or tokenEnv: VAR, --token / RELAY_TOKEN
    providers:
      - name: llama                      # the public name on the relay
        url: http://localhost:11434      # backend base URL: <url>/v1/chat/completions
        model: llama3.1:8b               # the backend's model id
        type: openai                     # default
        description: Llama 3.1 8B on my desktop
        apiKey: ... | apiKeyEnv: VAR     # sent to the backend as a Bearer token
        health: GET /v1/models           # default; "/health" means "GET /health"
        maxConcurrency: 8                # more tasks wait in the agent, FIFO
        requestTimeoutSeconds: 600       # longest silence from the backend
        wake:                            # optional: the backend may hibernate
          type: http                     # or command, or vllm
          url: http://gpu-box:8000/wake_up   # http: one request
          method: POST                   # http, default POST
          headers: {}                    # http
          body: null                     # http: JSON (or a string sent as is)
          command: systemctl             # command: argv[0], run WITHOUT a shell;
          args: [start, ollama]          #   it must exit (start a service, not be one)
          timeoutSeconds: 30             # the request / command itself
          maxWaitSeconds: 60             # then poll ``health`` this long

``type: vllm`` posts ``<url>/wake_up`` and counts ``GET /is_sleeping`` ->
``{"is_sleeping": true}`` as not available. A provider with a wake recipe
whose backend is not available registers as ``hibernating``.

A provider ``url`` is the server's base URL, without ``/v1``; a trailing
``/v1`` (as in Ollama's docs) or ``/`` is tolerated and stripped.

Precedence of relay settings: command-line flag > environment variable
(``RELAY_URL`` / ``RELAY_TOKEN``) > file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

__all__ = [
    "ConfigError",
    "ProviderConfig",
    "PublisherConfig",
    "WakeCommand",
    "WakeConfig",
    "WakeHttp",
    "WakeVllm",
    "load_config",
]

ENV_RELAY_URL = "RELAY_URL"
ENV_RELAY_TOKEN = "RELAY_TOKEN"
DEFAULT_HEALTH = "GET /v1/models"
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per mistake."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _check_url(value: str) -> str:
    """Accept ``http(s)://host[:port][/base]``; the message names the bad value."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f'bad URL "{value}": expected http://host[:port][/path] or https://...')
    try:
        parts.port  # noqa: B018 - raises on a non-numeric or out-of-range port
    except ValueError:
        raise ValueError(f'bad URL "{value}": invalid port') from None
    if parts.query or parts.fragment:
        raise ValueError(f'bad URL "{value}": a base URL takes no query or fragment')
    return value


class _Model(BaseModel):
    """File models: camelCase keys, unknown keys rejected, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, frozen=True)


class _WakeBase(_Model):
    max_wait_seconds: float = Field(default=60.0, gt=0)
    """How long to poll the backend's health after the recipe ran."""
    timeout_seconds: float = Field(default=30.0, gt=0)
    """How long the recipe itself (HTTP request or command) may take."""


class WakeHttp(_WakeBase):
    """Wake the backend with one HTTP request (e.g. a power or model-loader API)."""

    type: Literal["http"]
    url: str
    method: str = "POST"
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None

    _url = field_validator("url")(_check_url)

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value.upper() not in _HTTP_METHODS:
            raise ValueError(f'unknown HTTP method "{value}"')
        return value.upper()


class WakeCommand(_WakeBase):
    """Wake the backend by running a program (never through a shell)."""

    type: Literal["command"]
    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)


class WakeVllm(_WakeBase):
    """vLLM sleep mode: ``POST /wake_up``; ``GET /is_sleeping`` says whether it sleeps."""

    type: Literal["vllm"]


WakeConfig = Annotated[WakeHttp | WakeCommand | WakeVllm, Field(discriminator="type")]


class ProviderConfig(_Model):
    """One local model published on the relay under ``name``."""

    name: str = Field(min_length=1)
    url: str
    model: str = Field(min_length=1)
    type: str = "openai"
    description: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    health: str = DEFAULT_HEALTH
    max_concurrency: int = Field(default=8, ge=1)
    request_timeout_seconds: float = Field(default=600.0, gt=0)
    wake: WakeConfig | None = None

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        _check_url(value)
        base = value.rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        return base

    @field_validator("health")
    @classmethod
    def _health(cls, value: str) -> str:
        words = value.split()
        if len(words) == 1:
            words = ["GET", *words]
        if len(words) != 2 or words[0].upper() not in _HTTP_METHODS or not words[1].startswith("/"):
            raise ValueError(f'bad health check "{value}": expected "/path" or "GET /path"')
        return f"{words[0].upper()} {words[1]}"

    @property
    def health_method(self) -> str:
        return self.health.split()[0]

    @property
    def health_path(self) -> str:
        return self.health.split()[1]


class _RelaySection(_Model):
    url: str | None = None
    token: str | None = None
    token_env: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value)


class _ConfigFile(_Model):
    relay: _RelaySection = Field(default_factory=_RelaySection)
    providers: list[ProviderConfig] = Field(min_length=1)


@dataclass(frozen=True)
class PublisherConfig:
    """Everything the agent needs, resolved: secrets read from the environment."""

    relay_url: str
    token: str
    providers: tuple[ProviderConfig, ...] = ()
    source: str = "<memory>"

    def __repr__(self) -> str:  # never show the token
        names = ", ".join(p.name for p in self.providers)
        return f"PublisherConfig(relay_url={self.relay_url!r}, providers=[{names}])"

    @classmethod
    def build(
        cls,
        relay_url: str,
        token: str,
        providers: Sequence[Mapping[str, Any] | ProviderConfig],
        *,
        environ: Mapping[str, str] | None = None,
    ) -> PublisherConfig:
        """Validate providers given as dicts (file syntax) for in-process use."""
        data = {
            "relay": {"url": relay_url, "token": token},
            "providers": [
                p.model_dump(by_alias=True, exclude_none=True)
                if isinstance(p, ProviderConfig)
                else dict(p)
                for p in providers
            ],
        }
        return _resolve(data, "<memory>", None, None, os.environ if environ is None else environ)


# --- Loading ------------------------------------------------------------------


def load_config(
    path: str | os.PathLike[str],
    *,
    relay_url: str | None = None,
    token: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> PublisherConfig:
    """Read, validate and resolve a config file; raise :class:`ConfigError`.

    ``relay_url`` and ``token`` are the command-line overrides; the
    environment (``RELAY_URL`` / ``RELAY_TOKEN``) comes next, the file last.
    """
    env = os.environ if environ is None else environ
    source = str(path)
    file = Path(path)
    if not file.exists():
        raise ConfigError([f"config file not found: {source}"])
    if not file.is_file():
        raise ConfigError([f"config file is not a regular file: {source}"])
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read config file {source}: {exc}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{source}: invalid YAML{where}: {problem}"]) from None
    if data is None:
        raise ConfigError([f'{source}: the file is empty; it needs "relay" and "providers"'])
    if not isinstance(data, dict):
        raise ConfigError(
            [f'{source}: the file must be a mapping with "relay" and "providers" keys']
        )
    return _resolve(data, source, relay_url, token, env)


def _resolve(
    data: dict[str, Any],
    source: str,
    relay_url: str | None,
    token: str | None,
    env: Mapping[str, str],
) -> PublisherConfig:
    try:
        parsed = _ConfigFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([f"{source}: {line}" for line in _explain(exc, data)]) from None

    problems: list[str] = []
    seen: dict[str, int] = {}
    for i, provider in enumerate(parsed.providers):
        if provider.name in seen:
            problems.append(
                f"{source}: {_entry(data, i)}: duplicate provider name "
                f"(already used by providers[{seen[provider.name]}])"
            )
        else:
            seen[provider.name] = i

    url = _pick_url(parsed.relay, relay_url, env, source, problems)
    secret = _pick_token(parsed.relay, token, env, source, problems)

    providers: list[ProviderConfig] = []
    for i, provider in enumerate(parsed.providers):
        if provider.api_key is not None and provider.api_key_env is not None:
            problems.append(
                f"{source}: {_entry(data, i)}: set either apiKey or apiKeyEnv, not both"
            )
        elif provider.api_key_env is not None:
            key = env.get(provider.api_key_env)
            if not key:
                problems.append(
                    f'{source}: {_entry(data, i)}: field "apiKeyEnv": environment variable '
                    f'"{provider.api_key_env}" is not set'
                )
            else:
                provider = provider.model_copy(update={"api_key": key})
        providers.append(provider)

    if problems:
        raise ConfigError(problems)
    assert url is not None and secret is not None
    return PublisherConfig(
        relay_url=url.rstrip("/"), token=secret, providers=tuple(providers), source=source
    )


def _pick_url(
    relay: _RelaySection,
    flag: str | None,
    env: Mapping[str, str],
    source: str,
    problems: list[str],
) -> str | None:
    for origin, value in (("--relay-url", flag), (ENV_RELAY_URL, env.get(ENV_RELAY_URL))):
        if value:
            try:
                return _check_url(value)
            except ValueError as exc:
                problems.append(f"{origin}: {exc}")
                return None
    if relay.url is None:
        problems.append(
            f"{source}: no relay URL: set relay.url in the file, {ENV_RELAY_URL} in the "
            "environment, or --relay-url"
        )
    return relay.url


def _pick_token(
    relay: _RelaySection,
    flag: str | None,
    env: Mapping[str, str],
    source: str,
    problems: list[str],
) -> str | None:
    if flag:
        return flag
    if env.get(ENV_RELAY_TOKEN):
        return env[ENV_RELAY_TOKEN]
    if relay.token is not None and relay.token_env is not None:
        problems.append(f"{source}: relay: set either token or tokenEnv, not both")
        return None
    if relay.token_env is not None:
        value = env.get(relay.token_env)
        if not value:
            problems.append(
                f'{source}: relay: field "tokenEnv": environment variable "{relay.token_env}" '
                "is not set"
            )
        return value or None
    if not relay.token:
        problems.append(
            f"{source}: no relay token: set relay.token or relay.tokenEnv in the file, "
            f"{ENV_RELAY_TOKEN} in the environment, or --token"
        )
        return None
    return relay.token


# --- Turning pydantic errors into sentences ------------------------------------

_WAKE_MODELS: dict[str, type[_Model]] = {
    "http": WakeHttp,
    "command": WakeCommand,
    "vllm": WakeVllm,
}

_EXPECTED = {
    "int": "an integer",
    "float": "a number",
    "string": "a string",
    "bool": "true or false",
    "list": "a list",
    "dict": "a mapping",
    "model": "a mapping",
}


def _entry(data: Mapping[str, Any], index: int) -> str:
    """``providers[1] (name "llama")`` when the entry has a usable name."""
    providers = data.get("providers")
    name = None
    if isinstance(providers, list) and index < len(providers):
        item = providers[index]
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"]
    return f'providers[{index}] (name "{name}")' if name else f"providers[{index}]"


def _split_loc(data: Mapping[str, Any], loc: tuple[int | str, ...]) -> tuple[str, list[str]]:
    """Split an error location into the entry and the field path within it."""
    if len(loc) >= 2 and loc[0] == "providers" and isinstance(loc[1], int):
        entry, rest = _entry(data, loc[1]), list(loc[2:])
    elif loc and loc[0] == "relay":
        entry, rest = "relay", list(loc[1:])
    else:
        entry, rest = "top level", list(loc)
    # A discriminated union adds the tag ("http") to the path: drop it.
    if len(rest) >= 2 and rest[0] == "wake" and rest[1] in _WAKE_MODELS:
        rest = [rest[0], *rest[2:]]
    field: list[str] = []
    for part in rest:
        if isinstance(part, int) and field:
            field[-1] += f"[{part}]"
        else:
            field.append(str(part))
    return entry, field


def _model_at(loc: tuple[int | str, ...]) -> type[_Model] | None:
    """The model whose fields live at ``loc`` (to list them on an unknown field)."""
    if not loc:
        return _ConfigFile
    if loc == ("relay",):
        return _RelaySection
    if len(loc) == 2 and loc[0] == "providers":
        return ProviderConfig
    if len(loc) == 4 and loc[0] == "providers" and loc[2] == "wake":
        return _WAKE_MODELS.get(str(loc[3]))
    return None


def _show(value: object) -> str:
    text = f'"{value}"' if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _explain(exc: ValidationError, data: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        kind = err["type"]
        entry, field = _split_loc(data, loc)
        name = ".".join(field)
        if kind == "missing":
            what = f'missing required field "{name}"'
        elif kind == "extra_forbidden":
            what = f'unknown field "{name}"'
            model = _model_at(loc[:-1])
            if model is not None:
                allowed = [f.alias or n for n, f in model.model_fields.items()]
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                what += f' (did you mean "{close[0]}"?)' if close else ""
                what += f"; allowed: {', '.join(allowed)}"
        elif kind == "union_tag_invalid":
            what = (
                f'field "{name}.type": unknown wake type {_show(err["input"]["type"])} '
                f"(expected one of: {', '.join(_WAKE_MODELS)})"
            )
        elif kind == "union_tag_not_found":
            what = f'missing required field "{name}.type" ({", ".join(_WAKE_MODELS)})'
        elif kind.endswith(("_type", "_parsing")):
            expected = _EXPECTED.get(kind.split("_")[0], kind.split("_")[0])
            subject = f'field "{name}" has' if name else "entry has"
            what = f"{subject} the wrong type: expected {expected}, got {_show(err['input'])}"
        elif kind == "too_short" and name == "providers":
            what = 'no providers: "providers" needs at least one entry'
        elif kind == "value_error":
            what = f'field "{name}": {err["ctx"]["error"]}'
        else:
            what = f'field "{name}": {err["msg"]}'
        lines.append(f"{entry}: {what}")
    return lines
