"""The processes the benchmark starts, and what /proc says about them.

Everything runs on loopback, on free ports, as real processes, exactly as a
user would start them (``redis-server``, ``relay serve``, ``relay publish``,
the toy backend). Each is waited for by probing it, never by a fixed sleep,
and killed at the end. Self-contained on purpose: ``bench/`` does not import
the test helpers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready within {timeout} s (last error: {last})")


def http_get(url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: object, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Proc:
    """A started process with its log file and its /proc counters."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        # The user's RELAY_* variables must not change what is measured.
        base = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        self.proc = subprocess.Popen(
            argv,
            env={**base, **(env or {})},
            cwd=REPO,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def cpu(self) -> float:
        """User + system CPU seconds used so far (/proc/<pid>/stat)."""
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        """Resident set size in bytes (/proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Redis(Proc):
    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        super().__init__(
            "redis",
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
            ],
        )
        wait_until(self._pong, 10, "redis-server")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        self.check_alive()
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def version(self) -> str:
        out = subprocess.run(
            [shutil.which("redis-server") or "redis-server", "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return out.split("v=")[1].split()[0] if "v=" in out else out.strip()

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Toy(Proc):
    """The toy OpenAI-compatible backend: no artificial delay."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__(
            "toy",
            [sys.executable, "-m", "relay.toy_backend", "--port", str(self.port)],
        )

    def wait_ready(self) -> None:
        wait_until(self._up, 20, "toy backend")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        self.check_alive()
        return http_get(self.url + "/health")[0] == 200


# ``relay serve`` with uvloop as asyncio's loop, for ``--replica-loop uvloop``:
# what the relay would gain if its CLI picked uvloop itself.
_UVLOOP_SERVE = (
    "import sys, asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from relay.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Replica(Proc):
    def __init__(
        self, replica_id: str, redis_url: str, tokens_file: Path, *, loop: str = "default"
    ) -> None:
        self.port = free_port()
        self.replica_id = replica_id
        head = [sys.executable, "-m", "relay"]
        if loop == "uvloop":
            head = [sys.executable, "-c", _UVLOOP_SERVE]
        super().__init__(
            f"replica-{replica_id}",
            [*head, "serve", "--port", str(self.port)],
            env={
                "RELAY_REDIS_URL": redis_url,
                "RELAY_REDIS_PREFIX": "bench",
                "RELAY_REPLICA_ID": replica_id,
                "RELAY_TOKENS_FILE": str(tokens_file),
            },
        )

    def wait_ready(self) -> None:
        wait_until(self._ready, 30, self.name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        self.check_alive()
        return http_get(self.url + "/readyz")[0] == 200


class Publisher(Proc):
    """``relay publish`` with one provider (the toy backend), on one replica."""

    def __init__(self, relay_url: str, token: str, backend_url: str, name: str, workdir: Path):
        config = workdir / "publisher.yaml"
        config.write_text(
            json.dumps(
                {
                    "relay": {"url": relay_url, "token": token},
                    "providers": [
                        {
                            "name": name,
                            "url": backend_url,
                            "model": "toy-model",
                            "maxConcurrency": 256,
                        }
                    ],
                }
            )
        )
        super().__init__(
            "publisher", [sys.executable, "-m", "relay", "publish", "--config", str(config)]
        )


class LoadGen:
    """The load generator process, driven one JSON command at a time."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("loadgen.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        assert self.call_raw() == {"ready": True}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def call_raw(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, **cmd: object) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self.call_raw()
        if "error" in out:
            raise RuntimeError(f"load generator: {out['error']}")
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)
