"""Real processes for tests: a private redis-server and relay replicas.

Each is started on a free loopback port and waited for by probing it (never
a fixed sleep); each is killed at teardown, so runs never share state.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready within {timeout} s (last error: {last})")


def redis_server_binary() -> str | None:
    return shutil.which("redis-server")


class RedisProcess:
    def __init__(self, port: int | None = None, extra: list[str] | None = None) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server not installed")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="relay-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *(extra or []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._pong, 10, f"redis-server on port {self.port}")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


class ReplicaProcess:
    """``relay serve`` in a subprocess, logging to a file the test can show."""

    def __init__(
        self,
        redis_url: str | None,
        *,
        prefix: str,
        replica_id: str,
        tokens_file: str | None = None,
        env: dict[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.replica_id = replica_id
        self.log_path = Path(tempfile.mkstemp(prefix=f"relay-{replica_id}-", suffix=".log")[1])
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        full_env.update(
            RELAY_REDIS_PREFIX=prefix,
            RELAY_REPLICA_ID=replica_id,
            RELAY_LOG_LEVEL="INFO",
            **(env or {}),
        )
        if redis_url:
            full_env["RELAY_REDIS_URL"] = redis_url
        if tokens_file:
            full_env["RELAY_TOKENS_FILE"] = tokens_file
        else:
            full_env["RELAY_NO_AUTH"] = "1"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", "serve", "--port", str(self.port)],
            env=full_env,
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, 20, f"relay replica {replica_id}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.replica_id} exited:\n{self.log()}")
        return httpx.get(self.url + "/readyz", timeout=0.5).status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
