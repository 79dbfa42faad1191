"""Settings and tokens are validated at start, with messages naming the setting."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from relay.auth import Authenticator, TokensError, load_authenticator
from relay.config import ConfigError, load_settings


def test_defaults_match_the_documented_lifecycle() -> None:
    s = load_settings(environ={})
    assert (s.heartbeat_timeout_seconds, s.inactive_retention_seconds) == (90, 14400)
    assert (s.task_timeout_seconds, s.max_body_bytes) == (300, 10 * 1024 * 1024)
    assert s.embedded and s.redis_prefix == "relay"


def test_environment_and_flags_flags_win() -> None:
    s = load_settings(
        {"port": 9000}, environ={"RELAY_PORT": "8000", "RELAY_REDIS_URL": "redis://x:6379/0"}
    )
    assert s.port == 9000 and s.redis_url == "redis://x:6379/0" and not s.embedded


def test_unknown_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="RELAY_HEARTBEAT_TIMEOUT"):
        load_settings(environ={"RELAY_HEARTBEAT_TIMEOUT": "90"})


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELAY_PORT": "eighty"}, "RELAY_PORT"),
        ({"RELAY_TASK_TIMEOUT_SECONDS": "-1"}, "RELAY_TASK_TIMEOUT_SECONDS"),
        ({"RELAY_REDIS_PREFIX": "a{b}"}, "RELAY_REDIS_PREFIX"),
        ({"RELAY_REDIS_SENTINELS": "h:26379"}, "RELAY_REDIS_MASTER_NAME"),
        ({"RELAY_HEARTBEAT_INTERVAL_SECONDS": "60"}, "RELAY_HEARTBEAT_INTERVAL_SECONDS"),
        ({"RELAY_LOG_LEVEL": "LOUD"}, "RELAY_LOG_LEVEL"),
    ],
)
def test_invalid_values_are_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(environ=env)


def test_relay_serve_exits_2_naming_the_setting() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--no-auth"],
        env={"RELAY_MAX_BODY_BYTES": "lots", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2 and "RELAY_MAX_BODY_BYTES" in proc.stderr


def test_tokens_file_plain_and_hashed(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"hashed-token-123").hexdigest()
    f = tmp_path / "tokens.yaml"
    f.write_text(
        "- {name: alice, token: plain-token-123, scopes: [publish]}\n"
        f"- {{name: bob, tokenSha256: {digest}, scopes: [infer, admin]}}\n"
    )
    auth = load_authenticator(str(f), None, False)
    alice, bob = auth.principal_for("plain-token-123"), auth.principal_for("hashed-token-123")
    assert alice is not None and alice.name == "alice" and alice.scopes == {"publish"}
    assert bob is not None and bob.scopes == {"infer", "admin"}
    assert auth.principal_for("nope") is None and auth.principal_for(None) is None


def test_tokens_json_variable() -> None:
    auth = load_authenticator(
        None, '[{"name": "c", "token": "json-token-1", "scopes": ["infer"]}]', False
    )
    assert (
        auth.principal_for("json-token-1") or Authenticator.no_auth().principal_for(None)
    ).name == "c"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- {name: a, scopes: [infer]}", "exactly one of 'token' or 'tokenSha256'"),
        ("- {name: a, token: short, scopes: [infer]}", "8 characters"),
        ("- {name: a, token: long-enough-1, scopes: [root]}", "'scopes'"),
        ("- {name: a, token: long-enough-1, scopes: [infer], extra: 1}", "unknown field"),
        ("- {name: a, tokenSha256: abc, scopes: [infer]}", "64 hex digits"),
        ("{}", "non-empty list"),
        ("- [unclosed", "not valid YAML"),
    ],
)
def test_bad_tokens_files_say_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "tokens.yaml"
    f.write_text(text)
    with pytest.raises(TokensError, match=message) as err:
        load_authenticator(str(f), None, False)
    assert str(f) in str(err.value)


def test_no_tokens_at_all_says_how_to_fix() -> None:
    with pytest.raises(TokensError, match="--no-auth"):
        load_authenticator(None, None, False)


def test_no_auth_gives_anonymous_every_scope() -> None:
    p = load_authenticator(None, None, True).principal_for(None)
    assert p is not None and p.name == "anonymous" and p.scopes == {"publish", "infer", "admin"}
