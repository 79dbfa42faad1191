"""Bearer tokens: who is calling (the principal) and what they may do (scopes).

Tokens come from a YAML/JSON file (``--tokens-file``) or ``RELAY_TOKENS``
(JSON), each entry ``{"name", "token" | "tokenSha256", "scopes"}``. Lookups
hash the presented token and compare digests in constant time; plain tokens
are hashed at load and never kept or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SCOPES = frozenset({"publish", "infer", "admin"})
ANONYMOUS = "anonymous"


class TokensError(Exception):
    """The tokens file or variable is unusable; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    scopes: frozenset[str]


@dataclass(frozen=True, slots=True)
class _Entry:
    digest: bytes
    principal: Principal


class Authenticator:
    """Maps presented bearer tokens to principals. ``None`` entries means
    --no-auth: everyone is ``anonymous`` with every scope."""

    def __init__(self, entries: list[_Entry] | None) -> None:
        self._entries = entries

    @property
    def disabled(self) -> bool:
        return self._entries is None

    def principal_for(self, token: str | None) -> Principal | None:
        if self._entries is None:
            return Principal(ANONYMOUS, SCOPES)
        if not token:
            return None
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for entry in self._entries:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry.principal
        return found

    def add(self, name: str, token: str, scopes: frozenset[str]) -> None:
        """Accept one more token (the embedded demo publisher's)."""
        if self._entries is not None:
            digest = hashlib.sha256(token.encode()).digest()
            self._entries.append(_Entry(digest, Principal(name, scopes)))

    @classmethod
    def no_auth(cls) -> Authenticator:
        return cls(None)

    @classmethod
    def from_config(cls, source: str, entries: Any) -> Authenticator:
        if not isinstance(entries, list) or not entries:
            raise TokensError(f"{source}: expected a non-empty list of token entries")
        parsed = []
        for i, item in enumerate(entries):
            where = f"{source}: entry {i}"
            if not isinstance(item, dict):
                raise TokensError(f"{where}: expected a mapping with name, token and scopes")
            unknown = set(item) - {"name", "token", "tokenSha256", "scopes"}
            if unknown:
                raise TokensError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise TokensError(f"{where}: 'name' must be a non-empty string")
            where = f"{source}: entry {i} ({name!r})"
            scopes = item.get("scopes")
            if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
                raise TokensError(f"{where}: 'scopes' must be a list drawn from {sorted(SCOPES)}")
            if ("token" in item) == ("tokenSha256" in item):
                raise TokensError(f"{where}: give exactly one of 'token' or 'tokenSha256'")
            if "token" in item:
                if not isinstance(item["token"], str) or len(item["token"]) < 8:
                    raise TokensError(f"{where}: 'token' must be a string of 8 characters or more")
                digest = hashlib.sha256(item["token"].encode()).digest()
            else:
                try:
                    digest = bytes.fromhex(str(item["tokenSha256"]))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise TokensError(f"{where}: 'tokenSha256' must be 64 hex digits")
            parsed.append(_Entry(digest, Principal(name, frozenset(scopes))))
        return cls(parsed)


def load_authenticator(
    tokens_file: str | None, tokens_json: str | None, no_auth: bool
) -> Authenticator:
    if no_auth:
        return Authenticator.no_auth()
    if tokens_file:
        path = Path(tokens_file)
        try:
            text = path.read_text()
        except OSError as exc:
            raise TokensError(
                f"RELAY_TOKENS_FILE {tokens_file}: cannot read ({exc.strerror})"
            ) from None
        try:
            data = yaml.safe_load(text)  # YAML is a superset of JSON
        except yaml.YAMLError as exc:
            raise TokensError(
                f"RELAY_TOKENS_FILE {tokens_file}: not valid YAML/JSON: {exc}"
            ) from None
        return Authenticator.from_config(f"RELAY_TOKENS_FILE {tokens_file}", data)
    if tokens_json:
        try:
            data = json.loads(tokens_json)
        except ValueError as exc:
            raise TokensError(f"RELAY_TOKENS: not valid JSON: {exc}") from None
        return Authenticator.from_config("RELAY_TOKENS", data)
    raise TokensError(
        "no tokens configured: pass --tokens-file (RELAY_TOKENS_FILE) or RELAY_TOKENS, "
        "or --no-auth (RELAY_NO_AUTH=1) for local play"
    )
