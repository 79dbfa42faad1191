"""What the relay adds on top of a direct call: one command, one table.

    .venv/bin/python -m bench            # full run, about 2 minutes
    .venv/bin/python -m bench --quick    # about 1 minute, noisier

Starts on loopback a toy OpenAI-compatible backend (no artificial delay), a
real ``redis-server``, three relay replicas, ``relay publish`` connected to
replica 0 and a load generator (``bench/loadgen.py``, its own process) that
sends to replicas 1 and 2, so every request crosses replicas. The same load
also goes straight to the toy backend (the baseline); the two alternate,
A B A B ..., so drift on a shared machine hits both alike. Results go to
``bench/results/latest.json`` and ``latest.md`` (plus ``latency.png`` when
matplotlib is installed); ``--save`` also copies them to ``bench/RESULTS.md``,
``bench/results.json`` and ``bench/latency.png`` for committing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # ``python bench/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.procs import (
        REPO,
        LoadGen,
        Proc,
        Publisher,
        Redis,
        Replica,
        Toy,
        http_get,
        http_post,
        wait_until,
    )
else:
    from .procs import (
        REPO,
        LoadGen,
        Proc,
        Publisher,
        Redis,
        Replica,
        Toy,
        http_get,
        http_post,
        wait_until,
    )

BENCH = Path(__file__).resolve().parent
LLM = "bench"
PUBLISH_TOKEN = "bench-publish-token"
INFER_TOKEN = "bench-infer-token"
STREAM_CHUNKS = 200
MESSAGES = [{"role": "user", "content": "hello"}]


@dataclass
class Plan:
    latency_rounds: int = 8
    latency_n: int = 300
    load_rounds: int = 4
    load_seconds: float = 3.0
    stream_rounds: int = 4
    stream_seconds: float = 3.0
    throughput_concurrency: int = 32
    stream_concurrency: int = 16
    monitor_requests: int = 200
    monitor_streams: int = 10
    sessions: int = 5000

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            latency_rounds=4,
            latency_n=150,
            load_rounds=2,
            load_seconds=2.0,
            stream_rounds=2,
            stream_seconds=2.0,
            sessions=5000,
        )


@dataclass
class Stack:
    """Every process of the benchmark, started and stopped together."""

    workdir: Path
    redis: Redis
    toy: Toy
    replicas: list[Replica]
    publisher: Publisher
    loadgen: LoadGen
    procs: list[Proc] = field(default_factory=list)

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far, per process (relay replicas also summed)."""
        out = {p.name: p.cpu() for p in (self.redis, self.toy, self.publisher, *self.replicas)}
        out["loadgen"] = self.loadgen.cpu()
        out["relay"] = sum(r.cpu() for r in self.replicas)
        return out

    def check(self) -> None:
        for p in (self.redis, self.toy, self.publisher, *self.replicas):
            p.check_alive()

    def stop(self) -> None:
        self.loadgen.stop()
        for p in (self.publisher, *self.replicas, self.toy, self.redis):
            p.stop()


def start(workdir: Path, replica_loop: str = "default") -> Stack:
    tokens = workdir / "tokens.json"
    tokens.write_text(
        json.dumps(
            [
                {"name": "bench-publisher", "token": PUBLISH_TOKEN, "scopes": ["publish"]},
                {"name": "bench-consumer", "token": INFER_TOKEN, "scopes": ["infer"]},
            ]
        )
    )
    redis = Redis()
    toy = Toy()
    replicas = [Replica(f"r{i}", redis.url, tokens, loop=replica_loop) for i in range(3)]
    toy.wait_ready()
    for r in replicas:
        r.wait_ready()
    publisher = Publisher(replicas[0].url, PUBLISH_TOKEN, toy.url, LLM, workdir)

    def registered() -> bool:
        publisher.check_alive()
        status, body = http_get(replicas[1].url + "/v1/models", INFER_TOKEN)
        rows = json.loads(body).get("data", []) if status == 200 else []
        return any(r["id"] == LLM and r.get("status") == "active" for r in rows)

    wait_until(registered, 30, "publisher registration")
    return Stack(workdir, redis, toy, replicas, publisher, LoadGen())


def sanity(stack: Stack) -> None:
    """One request and one stream by hand: the relay answers what the backend says."""
    url = stack.replicas[1].url + "/v1/chat/completions"
    status, body = http_post(url, {"model": LLM, "messages": MESSAGES}, INFER_TOKEN)
    if status != 200 or b"echo: hello" not in body:
        raise RuntimeError(f"relay sanity request failed: {status} {body[:300]!r}")
    status, body = http_post(
        url,
        {"model": LLM, "messages": MESSAGES, "stream": True, "x_chunks": STREAM_CHUNKS},
        INFER_TOKEN,
    )
    events = body.count(b"data: ") - body.count(b"data: [DONE]")
    if status != 200 or events != STREAM_CHUNKS:
        raise RuntimeError(f"relay sanity stream failed: {status}, {events} events")


# --- measurements ---------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    """Percentiles in milliseconds."""
    return {
        f"p{p:g}".replace(".", "_"): pct(values, p) * 1000 for p in (50, 75, 90, 95, 99, 99.9)
    } | {"n": len(values)}


class Targets:
    """Where the load goes: the relay (replicas 1 and 2) or the backend itself."""

    def __init__(self, stack: Stack) -> None:
        self.relay = [["127.0.0.1", r.port] for r in stack.replicas[1:]]
        self.direct = [["127.0.0.1", stack.toy.port]]
        auth = {"Authorization": f"Bearer {INFER_TOKEN}", "Content-Type": "application/json"}
        self.headers = {"relay": auth, "direct": {"Content-Type": "application/json"}}

    def cmd(self, side: str, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": LLM if side == "relay" else "toy-model"}
        body["messages"] = MESSAGES
        if stream:
            body |= {"stream": True, "x_chunks": STREAM_CHUNKS}
        return {
            "targets": self.relay if side == "relay" else self.direct,
            "path": "/v1/chat/completions",
            "headers": self.headers[side],
            "body": json.dumps(body, separators=(",", ":")),
        }


def interleaved(stack: Stack, rounds: int, run: Any, label: str) -> dict[str, dict[str, Any]]:
    """Run ``run(side)`` A B A B ..., summing results and CPU use per side."""
    acc: dict[str, dict[str, Any]] = {
        side: {"results": [], "cpu": Counter(), "wall": 0.0} for side in ("relay", "direct")
    }
    for i in range(rounds):
        for side in ("relay", "direct"):
            before, t0 = stack.cpu(), time.perf_counter()
            out = run(side)
            wall = time.perf_counter() - t0
            after = stack.cpu()
            acc[side]["results"].append(out)
            acc[side]["cpu"].update({k: after[k] - before[k] for k in after})
            acc[side]["wall"] += wall
        stack.check()
        print(f"  {label}: round {i + 1}/{rounds}", file=sys.stderr, flush=True)
    return acc


def measure_latency(stack: Stack, targets: Targets, plan: Plan) -> dict[str, Any]:
    acc = interleaved(
        stack,
        plan.latency_rounds,
        lambda side: stack.loadgen.call(
            op="latency", n=plan.latency_n, **targets.cmd(side, stream=False)
        ),
        "latency, concurrency 1",
    )
    out: dict[str, Any] = {}
    for side, a in acc.items():
        lat = [x for r in a["results"] for x in r["latencies"]]
        out[side] = summary(lat)
        out[side]["errors"] = sum(r["errors"] for r in a["results"])
        out[side]["_raw"] = lat
    out["added_p50_ms"] = out["relay"]["p50"] - out["direct"]["p50"]
    out["added_p99_ms"] = out["relay"]["p99"] - out["direct"]["p99"]
    return out


def measure_load(stack: Stack, targets: Targets, plan: Plan, *, stream: bool) -> dict[str, Any]:
    conc = plan.stream_concurrency if stream else plan.throughput_concurrency
    rounds = plan.stream_rounds if stream else plan.load_rounds
    seconds = plan.stream_seconds if stream else plan.load_seconds
    acc = interleaved(
        stack,
        rounds,
        lambda side: stack.loadgen.call(
            op="load", concurrency=conc, duration=seconds, **targets.cmd(side, stream=stream)
        ),
        f"{'streams' if stream else 'throughput'}, concurrency {conc}",
    )
    out: dict[str, Any] = {"concurrency": conc}
    for side, a in acc.items():
        res = a["results"]
        n = sum(r["requests"] for r in res)
        events = sum(r["events"] for r in res)
        elapsed = sum(r["elapsed"] for r in res)
        cpu: Counter[str] = a["cpu"]
        per = events if stream else n
        out[side] = {
            "requests": n,
            "errors": sum(r["errors"] for r in res),
            "elapsed_s": elapsed,
            "requests_per_s": n / elapsed,
            "latency_ms": summary([x for r in res for x in r["latencies"]]),
            "cpu_s": dict(cpu),
            "cpu_us_per_" + ("chunk" if stream else "request"): {
                k: v / per * 1e6 for k, v in cpu.items()
            },
            "loadgen_cpu_percent": cpu["loadgen"] / a["wall"] * 100,
        }
        if stream:
            out[side]["chunks"] = events
            out[side]["chunks_per_s"] = events / elapsed
            out[side]["ttfc_ms"] = summary([x for r in res for x in r["ttfc"]])
            if events != n * STREAM_CHUNKS:
                out[side]["short_streams"] = n * STREAM_CHUNKS - events
    if stream:
        out["added_ttfc_p50_ms"] = out["relay"]["ttfc_ms"]["p50"] - out["direct"]["ttfc_ms"]["p50"]
    return out


class Monitor:
    """Redis ``MONITOR`` on a raw socket, read by a thread while load runs."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.sendall(b"MONITOR\r\n")
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 5
        while b"+OK" not in self.data and time.monotonic() < deadline:
            time.sleep(0.01)

    def _read(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                part = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            if not part:
                return
            self.data += part

    def stop(self) -> Counter[str]:
        """Commands sent by clients, by name; Lua's own calls left out."""
        time.sleep(0.2)
        self._stop.set()
        self._thread.join()
        self.sock.close()
        counts: Counter[str] = Counter()
        for line in bytes(self.data).decode(errors="replace").splitlines():
            m = re.match(r'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
            if m and m.group(1) != "lua":
                counts[m.group(2).upper()] += 1
        return counts


def measure_round_trips(stack: Stack, targets: Targets, plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for what, stream, n in (
        ("request", False, plan.monitor_requests),
        ("stream", True, plan.monitor_streams),
    ):
        time.sleep(0.3)  # let background work of the previous phase settle
        mon = Monitor(stack.redis.port)
        stack.loadgen.call(op="latency", n=n, **targets.cmd("relay", stream=stream))
        counts = mon.stop()
        total = sum(counts.values())
        out[f"per_{what}"] = total / n
        out[f"by_command_per_{what}"] = {k: v / n for k, v in counts.most_common()}
        out[f"sample_{what}s"] = n
    out["per_chunk"] = out["per_stream"] / STREAM_CHUNKS
    return out


def measure_sessions(stack: Stack, plan: Plan) -> dict[str, Any]:
    """Idle publisher channels on one replica: memory each."""
    replica = stack.replicas[2]
    time.sleep(0.5)
    before = replica.rss()
    t0 = time.perf_counter()
    res = stack.loadgen.call(
        op="sessions",
        n=plan.sessions,
        target=["127.0.0.1", replica.port],
        path="/api/v1/providers/session",
        headers={"Authorization": f"Bearer {PUBLISH_TOKEN}", "Accept": "text/event-stream"},
    )
    took = time.perf_counter() - t0
    time.sleep(1.0)
    after = replica.rss()
    replica.check_alive()
    opened = int(res["opened"])
    return {
        "replica": replica.replica_id,
        "requested": plan.sessions,
        "opened": opened,
        "failed": res["failed"],
        "open_seconds": took,
        "rss_before_mb": before / 2**20,
        "rss_after_mb": after / 2**20,
        "kb_per_session": (after - before) / max(opened, 1) / 1024,
    }


# --- report -----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    lat, thr, st = r["latency_c1"], r["throughput_c32"], r["streams_c16"]
    cpu_req = thr["relay"]["cpu_us_per_request"]["relay"]
    cpu_chunk = st["relay"]["cpu_us_per_chunk"]["relay"]
    rows = [
        ("added latency p50, non-streaming, c=1", lat["added_p50_ms"], "ms", "<=", 2.0),
        ("added latency p99, non-streaming, c=1", lat["added_p99_ms"], "ms", "<=", 5.0),
        ("throughput, non-streaming, c=32", thr["relay"]["requests_per_s"], "req/s", ">=", 1500),
        ("chunks/s, 200-chunk streams, c=16", st["relay"]["chunks_per_s"], "chunks/s", ">=", 20000),
        ("time to first chunk added (p50), c=16", st["added_ttfc_p50_ms"], "ms", "<=", 3.0),
        ("relay CPU per request (3 replicas)", cpu_req, "us", "<=", 500),
        ("relay CPU per chunk (3 replicas)", cpu_chunk, "us", "<=", 30),
        ("Redis round trips per request", r["redis"]["per_request"], "", "<=", 6),
        ("memory per idle publisher session", r["sessions"]["kb_per_session"], "KB", "<=", 20),
    ]
    out = []
    for name, value, unit, op, target in rows:
        met = value <= target if op == "<=" else value >= target
        out.append(
            {"figure": name, "value": value, "unit": unit, "target": f"{op} {target:g}", "met": met}
        )
    return out


def fmt(v: float) -> str:
    if v != v:  # NaN
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lat, thr, st = r["latency_c1"], r["throughput_c32"], r["streams_c16"]
    lines = [
        f"Run {m['date']} at commit {m['commit']} on {m['cores']} x {m['cpu']}, "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Python {m['python']}, "
        f"Redis {r['redis_version']}; everything (Redis, 3 replicas, publisher, toy backend, "
        f"load generator) on that one machine. Mode: {r['mode']}.",
        "",
        "| figure | relay | direct | added | target | met |",
        "|---|---:|---:|---:|---|:-:|",
    ]
    v = {row["figure"]: row for row in r["verdicts"]}

    def row(name: str, relay: str, direct: str, added: str) -> None:
        t = v[name]
        ok = "yes" if t["met"] else "**no**"
        lines.append(
            f"| {name} | {relay} | {direct} | {added} | {t['target']} {t['unit']} | {ok} |"
        )

    row(
        "added latency p50, non-streaming, c=1",
        f"{fmt(lat['relay']['p50'])} ms",
        f"{fmt(lat['direct']['p50'])} ms",
        f"{fmt(lat['added_p50_ms'])} ms",
    )
    row(
        "added latency p99, non-streaming, c=1",
        f"{fmt(lat['relay']['p99'])} ms",
        f"{fmt(lat['direct']['p99'])} ms",
        f"{fmt(lat['added_p99_ms'])} ms",
    )
    row(
        "throughput, non-streaming, c=32",
        f"{fmt(thr['relay']['requests_per_s'])} req/s",
        f"{fmt(thr['direct']['requests_per_s'])} req/s",
        "",
    )
    row(
        "chunks/s, 200-chunk streams, c=16",
        f"{fmt(st['relay']['chunks_per_s'])}",
        f"{fmt(st['direct']['chunks_per_s'])}",
        "",
    )
    row(
        "time to first chunk added (p50), c=16",
        f"{fmt(st['relay']['ttfc_ms']['p50'])} ms",
        f"{fmt(st['direct']['ttfc_ms']['p50'])} ms",
        f"{fmt(st['added_ttfc_p50_ms'])} ms",
    )
    row(
        "relay CPU per request (3 replicas)",
        f"{fmt(thr['relay']['cpu_us_per_request']['relay'])} us",
        "",
        "",
    )
    row(
        "relay CPU per chunk (3 replicas)",
        f"{fmt(st['relay']['cpu_us_per_chunk']['relay'])} us",
        "",
        "",
    )
    row("Redis round trips per request", fmt(r["redis"]["per_request"]), "", "")
    s = r["sessions"]
    row(
        "memory per idle publisher session",
        f"{fmt(s['kb_per_session'])} KB ({s['opened']:,} open)",
        "",
        "",
    )
    lines += [
        "",
        "CPU per request at c=32 (us) and per chunk at c=16, by process:",
        "",
        "| process | per request (relay) | per request (direct) | per chunk (relay) | per chunk (direct) |",
        "|---|---:|---:|---:|---:|",
    ]
    names = [
        "relay",
        "replica-r0",
        "replica-r1",
        "replica-r2",
        "publisher",
        "toy",
        "redis",
        "loadgen",
    ]
    for n in names:
        lines.append(
            f"| {n} | {fmt(thr['relay']['cpu_us_per_request'].get(n, 0))} "
            f"| {fmt(thr['direct']['cpu_us_per_request'].get(n, 0))} "
            f"| {fmt(st['relay']['cpu_us_per_chunk'].get(n, 0))} "
            f"| {fmt(st['direct']['cpu_us_per_chunk'].get(n, 0))} |"
        )
    lines += [
        "",
        f"Load generator CPU (share of one core): {fmt(thr['relay']['loadgen_cpu_percent'])} % "
        f"(relay, c=32), {fmt(thr['direct']['loadgen_cpu_percent'])} % (direct, c=32), "
        f"{fmt(st['relay']['loadgen_cpu_percent'])} % (relay streams), "
        f"{fmt(st['direct']['loadgen_cpu_percent'])} % (direct streams).",
        "",
        "Latency at c=1 (ms): "
        + ", ".join(
            f"{k} {fmt(lat['relay'][k])} vs {fmt(lat['direct'][k])}"
            for k in ("p50", "p90", "p99", "p99_9")
        )
        + " (relay vs direct).",
        "",
        "Redis commands per non-streaming request (MONITOR, Lua's own calls excluded): "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["redis"]["by_command_per_request"].items())
        + f"; per 200-chunk stream: {fmt(r['redis']['per_stream'])} "
        f"({r['redis']['per_chunk']:.3f} per chunk).",
    ]
    errors = sum(
        x.get("errors", 0)
        for x in (
            lat["relay"],
            lat["direct"],
            thr["relay"],
            thr["direct"],
            st["relay"],
            st["direct"],
        )
    )
    if errors:
        lines += ["", f"**{errors} request(s) failed during the run.**"]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], raw: dict[str, list[float]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ps = [50, 75, 90, 95, 99, 99.9]
    fig, ax = plt.subplots(figsize=(7, 4))
    for side, style in (("relay", "o-"), ("direct", "s--")):
        ax.plot([str(p) for p in ps], [pct(raw[side], p) * 1000 for p in ps], style, label=side)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("Non-streaming chat completion, concurrency 1: relay vs direct")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter run (about a minute)")
    parser.add_argument("--sessions", type=int, help="idle sessions to open (default 5000)")
    parser.add_argument(
        "--save",
        action="store_true",
        help="also write bench/RESULTS.md, bench/results.json and bench/latency.png",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument(
        "--replica-loop",
        choices=["default", "uvloop"],
        default="default",
        help="run the replicas on uvloop through a shim (what 'relay serve' picking "
        "uvloop itself would buy); default: 'relay serve' exactly as shipped",
    )
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    if args.sessions is not None:
        plan.sessions = args.sessions
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = plan.sessions * 2 + 1024
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    print("starting redis-server, toy backend, 3 replicas, publisher ...", file=sys.stderr)
    stack = start(workdir, args.replica_loop)
    try:
        sanity(stack)
        targets = Targets(stack)
        for side in ("relay", "direct"):  # warm up both paths
            stack.loadgen.call(op="latency", n=100, **targets.cmd(side, stream=False))
            stack.loadgen.call(
                op="load", concurrency=4, duration=0.5, **targets.cmd(side, stream=True)
            )
        results: dict[str, Any] = {
            "mode": ("quick" if args.quick else "full")
            + (", replicas on uvloop (shim)" if args.replica_loop == "uvloop" else ""),
            "machine": machine(),
            "redis_version": stack.redis.version(),
            "plan": plan.__dict__,
        }
        results["latency_c1"] = measure_latency(stack, targets, plan)
        results["throughput_c32"] = measure_load(stack, targets, plan, stream=False)
        results["streams_c16"] = measure_load(stack, targets, plan, stream=True)
        print("  redis round trips (MONITOR sample)", file=sys.stderr)
        results["redis"] = measure_round_trips(stack, targets, plan)
        print(f"  {plan.sessions} idle sessions", file=sys.stderr)
        results["sessions"] = measure_sessions(stack, plan)
        stack.check()
    except BaseException:
        for p in (stack.publisher, *stack.replicas, stack.toy):
            if p.proc.poll() is not None:
                print(f"--- {p.name} log ---\n{p.log()}", file=sys.stderr)
        raise
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    raw = {side: results["latency_c1"][side].pop("_raw") for side in ("relay", "direct")}
    results["verdicts"] = verdicts(results)
    results["seconds"] = time.perf_counter() - started
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    md = markdown(results)
    (out / "latest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "latest.md").write_text(md)
    plotted = not args.no_plot and plot(results, raw, out / "latency.png")
    if args.save:
        shutil.copy(out / "latest.json", BENCH / "results.json")
        shutil.copy(out / "latest.md", BENCH / "RESULTS.md")
        if plotted:
            shutil.copy(out / "latency.png", BENCH / "latency.png")
    print(md)
    print(
        f"({results['seconds']:.0f} s; written to {out.relative_to(REPO)}/latest.json, latest.md"
        + (", latency.png" if plotted else "")
        + ")",
        file=sys.stderr,
    )
    return 0 if all(v["met"] for v in results["verdicts"]) else 1


if __name__ == "__main__":
    sys.exit(main())
