"""``relay worker`` (also ``python -m worker``): the housekeeping worker.

Runs the arq worker whose cron job sweeps the shared Redis every
``gc_interval_seconds``. Every flag has a RELAY_* environment equivalent
(flags win). Several worker replicas may run at once: each tick runs once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from arq.worker import Worker

from relay.config import ConfigError, load_settings
from worker.settings import quiet_arq_job_lines, worker_options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay worker",
        description=(
            "Run the housekeeping worker (arq) against the relays' shared Redis. "
            "Every flag has a RELAY_* environment equivalent."
        ),
    )
    p.add_argument("--redis-url", help="the relays' shared Redis (RELAY_REDIS_URL)")
    p.add_argument(
        "--redis-sentinels", help="host:port,... of Redis Sentinels (RELAY_REDIS_SENTINELS)"
    )
    p.add_argument("--redis-master-name", help="Sentinel master name (RELAY_REDIS_MASTER_NAME)")
    p.add_argument(
        "--redis-prefix", help="the relays' key prefix (RELAY_REDIS_PREFIX, default relay)"
    )
    p.add_argument(
        "--gc-interval-seconds",
        type=float,
        help="seconds between sweeps, dividing a minute or an hour (RELAY_GC_INTERVAL_SECONDS, "
        "default 15)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (RELAY_LOG_LEVEL)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, check the settings (exit 2 naming a bad one), run until
    SIGINT/SIGTERM, return 0."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(vars(args))
        if settings.embedded:
            raise ConfigError(
                "missing setting RELAY_REDIS_URL (--redis-url) or RELAY_REDIS_SENTINELS "
                "(--redis-sentinels): the worker sweeps a shared Redis; without one, "
                "`relay serve` sweeps its embedded store itself"
            )
        options = worker_options(settings)
    except ConfigError as exc:
        print(f"relay worker: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    quiet_arq_job_lines()
    try:
        Worker(**options).run()
    except asyncio.CancelledError:  # a job cancelled by SIGTERM mid-run: still a clean stop
        pass
    return 0
