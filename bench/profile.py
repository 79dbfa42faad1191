"""Profile the relay's processes under the benchmark's load with py-spy.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile             # non-streaming, c=32
    .venv/bin/python -m bench.profile --stream    # 200-chunk streams, c=16

Starts the same stack as ``python -m bench``, runs the load for
``--seconds`` while ``py-spy record`` samples replica r0 (holds the
publisher's channel), replica r1 (a consumer's replica) and the publisher,
and prints each one's top functions by own time and by total time. The raw
collapsed stacks stay in ``bench/results/profile-*.txt`` (feed them to
flamegraph.pl or speedscope for a picture).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.run import BENCH, Targets, sanity, start


def top(collapsed: Path, n: int) -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        samples += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    lines = [f"{samples} samples; by own time:"]
    lines += [f"  {v / samples * 100:5.1f}%  {f}" for f, v in own.most_common(n)]
    lines.append("by total time:")
    lines += [f"  {v / samples * 100:5.1f}%  {f}" for f, v in total.most_common(n)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--stream", action="store_true", help="200-chunk streams at c=16")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="default 32 (16 for streams); py-spy samples wall time, and on a saturated "
        "machine a process preempted right after a write shows as 'in write': a low "
        "concurrency leaves CPU free, so the samples are the processes' own work",
    )
    args = parser.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    workdir = Path(tempfile.mkdtemp(prefix="relay-profile-"))
    stack = start(workdir)
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    kind = "stream" if args.stream else "request"
    try:
        sanity(stack)
        targets = Targets(stack)
        stack.loadgen.call(op="latency", n=200, **targets.cmd("relay", stream=False))
        procs = {
            "r0": stack.replicas[0].pid,
            "r1": stack.replicas[1].pid,
            "publisher": stack.publisher.pid,
        }
        spies = {
            name: subprocess.Popen(
                [
                    spy,
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(int(args.seconds)),
                    "--rate",
                    str(args.rate),
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(out / f"profile-{kind}-{name}.txt"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for name, pid in procs.items()
        }
        conc = args.concurrency or (16 if args.stream else 32)
        res = stack.loadgen.call(
            op="load",
            concurrency=conc,
            duration=args.seconds,
            **targets.cmd("relay", stream=args.stream),
        )
        for p in spies.values():
            p.wait(60)
        print(f"{res['requests'] / res['elapsed']:.0f} req/s during the profile")
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    for name in procs:
        path = out / f"profile-{kind}-{name}.txt"
        if path.exists():
            print(f"\n=== {name} ({path.relative_to(BENCH.parent)}) ===")
            print(top(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
