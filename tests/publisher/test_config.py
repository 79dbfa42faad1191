"""Config validation: every mistake stops ``relay publish`` with its own message
(file, entry, field) and exit code 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from relay.publisher.cli import main
from relay.publisher.config import ConfigError, PublisherConfig, load_config

GOOD = """
relay:
  url: http://relay.example:8080
  token: secret-token
providers:
  - name: llama
    url: http://localhost:11434
    model: llama3.1:8b
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RELAY_URL", "RELAY_TOKEN", "MY_TOKEN", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def run_main(path: Path | str, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code = main(["--config", str(path), *extra])
    assert code == 2
    return capsys.readouterr().err


def test_good_file_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD))
    assert config.relay_url == "http://relay.example:8080"
    assert config.token == "secret-token"
    (llama,) = config.providers
    assert (llama.name, llama.url, llama.model, llama.type) == (
        "llama",
        "http://localhost:11434",
        "llama3.1:8b",
        "openai",
    )
    assert (llama.health_method, llama.health_path) == ("GET", "/v1/models")
    assert llama.max_concurrency == 8
    assert llama.wake is None
    assert "secret-token" not in repr(config)


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main(tmp_path / "nope.yaml", capsys)
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in err


def test_invalid_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "relay: {url: [\nproviders: -\n")
    err = run_main(path, capsys)
    assert f"{path}: invalid YAML at line" in err


def test_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main(write(tmp_path, "- a\n- b\n"), capsys)
    assert 'the file must be a mapping with "relay" and "providers" keys' in err


def test_missing_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("    model: llama3.1:8b\n", ""))
    err = run_main(path, capsys)
    assert f'{path}: providers[0] (name "llama"): missing required field "model"' in err


def test_unknown_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD + "    modle: x\n")
    err = run_main(path, capsys)
    assert f'{path}: providers[0] (name "llama"): unknown field "modle" (did you mean' in err


def test_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD + "    maxConcurrency: lots\n")
    err = run_main(path, capsys)
    assert (
        f'{path}: providers[0] (name "llama"): field "maxConcurrency" has the wrong type: '
        'expected an integer, got "lots"'
    ) in err


def test_second_entry_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(
        tmp_path,
        GOOD + "  - name: qwen\n    url: http://localhost:8000\n    model: 7\n",
    )
    err = run_main(path, capsys)
    assert 'providers[1] (name "qwen"): field "model" has the wrong type: expected a string' in err


def test_duplicate_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD + "  - name: llama\n    url: http://other:1\n    model: m\n")
    err = run_main(path, capsys)
    assert (
        f'{path}: providers[1] (name "llama"): duplicate provider name (already used by '
        "providers[0])"
    ) in err


def test_bad_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("http://localhost:11434", "localhost:11434"))
    err = run_main(path, capsys)
    assert f'{path}: providers[0] (name "llama"): field "url": bad URL "localhost:11434"' in err


def test_bad_relay_url_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main(write(tmp_path, GOOD), capsys, "--relay-url", "ftp://x")
    assert '--relay-url: bad URL "ftp://x"' in err


def test_missing_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("  token: secret-token\n", ""))
    err = run_main(path, capsys)
    assert f"{path}: no relay token: set relay.token or relay.tokenEnv" in err


def test_missing_relay_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("  url: http://relay.example:8080\n", ""))
    err = run_main(path, capsys)
    assert f"{path}: no relay URL: set relay.url" in err


def test_token_env_unset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD.replace("token: secret-token", "tokenEnv: MY_TOKEN"))
    err = run_main(path, capsys)
    assert f'{path}: relay: field "tokenEnv": environment variable "MY_TOKEN" is not set' in err


def test_api_key_env_unset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD + "    apiKeyEnv: MY_KEY\n")
    err = run_main(path, capsys)
    assert (
        f'{path}: providers[0] (name "llama"): field "apiKeyEnv": environment variable '
        '"MY_KEY" is not set'
    ) in err


def test_bad_wake_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD + "    wake: {type: magic}\n")
    err = run_main(path, capsys)
    assert 'field "wake.type": unknown wake type "magic" (expected one of: http, command' in err


def test_wake_missing_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD + "    wake: {type: http}\n")
    err = run_main(path, capsys)
    assert 'providers[0] (name "llama"): missing required field "wake.url"' in err


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD + "    modle: x\n  - name: b\n    url: nope\n    model: m\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert len(info.value.problems) == 2


def test_env_and_flags_override_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)
    monkeypatch.setenv("RELAY_URL", "http://from-env:1")
    monkeypatch.setenv("RELAY_TOKEN", "env-token")
    config = load_config(path)
    assert (config.relay_url, config.token) == ("http://from-env:1", "env-token")
    config = load_config(path, relay_url="http://from-flag:2/", token="flag-token")
    assert (config.relay_url, config.token) == ("http://from-flag:2", "flag-token")


def test_token_env_and_api_key_env_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_TOKEN", "t0k")
    monkeypatch.setenv("MY_KEY", "sk-1")
    text = GOOD.replace("token: secret-token", "tokenEnv: MY_TOKEN") + "    apiKeyEnv: MY_KEY\n"
    config = load_config(write(tmp_path, text))
    assert config.token == "t0k"
    assert config.providers[0].api_key == "sk-1"


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://h:11434", "http://h:11434"),
        ("http://h:11434/", "http://h:11434"),
        ("http://h:11434/v1", "http://h:11434"),
        ("http://h:11434/v1/", "http://h:11434"),
        ("https://h/prefix", "https://h/prefix"),
    ],
)
def test_provider_url_is_the_base_without_v1(url: str, base: str) -> None:
    config = PublisherConfig.build(
        "http://relay", "t", [{"name": "a", "url": url, "model": "m"}], environ={}
    )
    assert config.providers[0].url == base


@pytest.mark.parametrize(
    ("health", "method", "path"),
    [("/health", "GET", "/health"), ("get /health", "GET", "/health"), ("HEAD /", "HEAD", "/")],
)
def test_health_forms(health: str, method: str, path: str) -> None:
    config = PublisherConfig.build(
        "http://relay",
        "t",
        [{"name": "a", "url": "http://h", "model": "m", "health": health}],
        environ={},
    )
    assert (config.providers[0].health_method, config.providers[0].health_path) == (method, path)


def test_bad_health(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main(write(tmp_path, GOOD + "    health: health\n"), capsys)
    assert 'field "health": bad health check "health"' in err


def test_cli_usage_error_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "--config" in capsys.readouterr().err


def test_python_m_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay.publisher", "--config", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "config file not found" in proc.stderr
