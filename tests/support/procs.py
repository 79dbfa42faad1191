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


def start_replicas(count: int, make) -> list[ReplicaProcess]:  # type: ignore[no-untyped-def]
    """Start ``count`` replicas at once (``make(i)`` builds one): each start
    waits for readiness, so in parallel they take one start's time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(make, i) for i in range(count)]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                f.result().kill()
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futures]


# --- nginx: a real load balancer in front of replicas ------------------------


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


# The proxy settings the deployment docs recommend (k8s/README.md), for a
# plain nginx that only learns about a stopped replica from a refused
# connection (no endpoint updates, no active health checks):
#
# - no upstream keep-alive: every request opens a new connection, so a
#   replica that closed its listener is seen as "connection refused", never
#   as an idle pooled connection that dies while a request is sent on it;
# - proxy_next_upstream error timeout http_503 non_idempotent, at most 3
#   tries and only within 10 s of the request's start: a refused or reset
#   connection, or a 503 (draining, store failing over), goes to the next
#   replica. ``non_idempotent`` extends this to POST, which is safe here
#   because every relay POST is safe to repeat (an inference has no effect
#   but compute, and OpenAI clients retry it themselves; chunk posts carry
#   offsets; a repeated result post is a 404 the publisher ignores). Without
#   it, a POST that reached a replica's accept queue the instant its
#   listener closed would fail with 502;
# - plain round-robin for everything, task posts included: the relay puts a
#   task's chunk batches back in order whichever replicas they went through;
# - no response buffering and long read timeouts: SSE streams (the
#   publishers' control channels, the consumers' token streams) must flow
#   as they come and may stay quiet for a while between keep-alives.
NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
{user}
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$status $request_method $uri up=$upstream_addr '
                         'ups=$upstream_status rt=$request_time';
    access_log {dir}/access.log upstreams;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 10m;

    upstream relay {{
{servers}
    }}

    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_buffering off;
        proxy_cache off;
        proxy_connect_timeout 2s;
        proxy_read_timeout 3600s;
        proxy_send_timeout 3600s;
        proxy_next_upstream error timeout http_503 non_idempotent;
        proxy_next_upstream_tries 3;
        proxy_next_upstream_timeout 10s;

        location / {{
            proxy_pass http://relay;
        }}
    }}
}}
"""


class NginxProcess:
    """nginx round-robin over ``upstream_ports`` on loopback, in a temp dir."""

    def __init__(self, upstream_ports: list[int], *, port: int | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx not installed")
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="relay-nginx-")
        os.chmod(self.dir, 0o755)
        servers = "\n".join(
            f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports
        )
        # As root, nginx workers would switch to "nobody", who cannot write here.
        user = "user root root;" if os.geteuid() == 0 else ""
        self.conf = Path(self.dir, "nginx.conf")
        self.conf.write_text(
            NGINX_CONF.format(dir=self.dir, user=user, servers=servers, port=self.port)
        )
        self.proc = subprocess.Popen(
            [binary, "-p", self.dir, "-c", str(self.conf), "-e", f"{self.dir}/error.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._listening, 10, f"nginx on port {self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited:\n{self.error_log()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    def access_log(self) -> list[str]:
        path = Path(self.dir, "access.log")
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def error_log(self) -> str:
        path = Path(self.dir, "error.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- Redis Sentinel: one master, one replica, three sentinels ----------------

SENTINEL_CONF = """\
port {port}
bind 127.0.0.1
dir {dir}
sentinel resolve-hostnames no
sentinel monitor {name} 127.0.0.1 {master_port} 2
sentinel down-after-milliseconds {name} {down_after_ms}
sentinel failover-timeout {name} {failover_timeout_ms}
sentinel parallel-syncs {name} 1
"""


def _redis_call(port: int, *args: str) -> object:
    import redis

    client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


class SentinelProcess:
    def __init__(self, conf: str, port: int, dir: str) -> None:
        binary = redis_server_binary()
        assert binary is not None
        self.port = port
        path = Path(dir, f"sentinel-{port}.conf")
        path.write_text(conf)
        self.proc = subprocess.Popen(
            [binary, str(path), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class SentinelGroup:
    """A Sentinel-monitored master ``name`` with one replica, on loopback.

    Waits until the replica is in sync and every sentinel knows the replica
    and the two other sentinels, so a failover can be authorized at once."""

    def __init__(
        self, name: str = "m", *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000
    ) -> None:
        self.name = name
        self.dir = tempfile.mkdtemp(prefix="relay-sentinel-")
        # No diskless-sync delay: the replica is in sync in milliseconds, not 5 s.
        self.master = RedisProcess(extra=["--repl-diskless-sync-delay", "0"])
        self.replica = RedisProcess(
            extra=[
                "--replicaof",
                "127.0.0.1",
                str(self.master.port),
                "--repl-diskless-sync-delay",
                "0",
            ]
        )
        self.sentinels: list[SentinelProcess] = []
        try:
            wait_until(self._replica_synced, 15, "redis replica in sync")
            for _ in range(3):
                port = free_port()
                conf = SENTINEL_CONF.format(
                    port=port,
                    dir=self.dir,
                    name=name,
                    master_port=self.master.port,
                    down_after_ms=down_after_ms,
                    failover_timeout_ms=failover_timeout_ms,
                )
                self.sentinels.append(SentinelProcess(conf, port, self.dir))
            wait_until(self._sentinels_agree, 20, "sentinels to find each other", interval=0.1)
        except BaseException:
            self.stop()
            raise

    @property
    def addresses(self) -> str:
        """``host:port,...`` of the sentinels, as RELAY_REDIS_SENTINELS takes them."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def _replica_synced(self) -> bool:
        info = _redis_call(self.replica.port, "INFO", "replication")
        assert isinstance(info, dict)
        return info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        for s in self.sentinels:
            raw = _redis_call(s.port, "SENTINEL", "MASTER", self.name)
            fields = _pairs(raw)
            if fields.get("num-other-sentinels") != "2" or fields.get("num-slaves") != "1":
                return False
        return True

    def master_port(self) -> int:
        """The master's port as the first answering sentinel reports it."""
        for s in self.sentinels:
            try:
                addr = _redis_call(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except Exception:
                continue
            assert isinstance(addr, list | tuple)
            return int(addr[1])
        raise RuntimeError("no sentinel answers")

    def kill_master(self) -> None:
        """SIGKILL the master: no shutdown, no last replication."""
        self.master.proc.kill()
        self.master.proc.wait(5)

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        for r in (self.replica, self.master):
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait(5)
            shutil.rmtree(r.dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _pairs(raw: object) -> dict[str, str]:
    """A flat [k, v, k, v, ...] reply (or a dict) as a str dict."""
    if isinstance(raw, dict):
        items = list(raw.items())
    else:
        assert isinstance(raw, list | tuple)
        items = list(zip(raw[::2], raw[1::2], strict=True))

    def s(v: object) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    return {s(k): s(v) for k, v in items}
