"""arq worker settings for the housekeeping cron jobs.

``arq worker.settings.WorkerSettings`` reads every setting from the RELAY_*
environment, like a relay replica; ``relay worker`` builds the same options
from its flags with ``worker_options``. ``WorkerSettings`` is built on first
access (a module ``__getattr__``), so importing this module never fails on a
bad environment, and the CLI can apply its flags first.

Schedule: arq cron takes sets of seconds, minutes and hours, not intervals,
so ``RELAY_GC_INTERVAL_SECONDS`` must divide a minute (1, 2, 3, 4, 5, 6, 10,
12, 15, 20, 30), be whole minutes dividing an hour (60, 120, ... 1800), or
whole hours dividing a day; anything else is refused at start. Ticks are
wall-clock aligned, so every worker replica agrees on them.

Uniqueness across worker replicas: arq's cron job id is ``name:next_run_ms``
and a tick is skipped while its job or result key exists. The result is kept
``KEEP_RESULT_SECONDS``, so a replica up to that late does not re-run the
tick; beyond that, the sweep's own atomic re-checks make a re-run a no-op.
The cron name and queue carry the key prefix, so relays sharing a Redis
under different prefixes neither skip nor steal each other's ticks.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlparse

from arq.connections import ArqRedis, RedisSettings
from arq.cron import CronJob, cron
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from relay.config import ConfigError, Settings, load_settings
from relay.connections import patient_master, patient_url
from worker import jobs

# How long a tick's result (and so its uniqueness) is kept.
KEEP_RESULT_SECONDS = 60.0

# The same patience as the relay's own clients: long enough to ride out a
# Redis restart or Sentinel failover (a few seconds).
_RETRIES = 8


def cron_fields(interval: float) -> dict[str, set[int]]:
    """The arq cron fields (second/minute/hour sets) for a tick every
    ``interval`` seconds; ConfigError for intervals cron cannot express."""
    n = round(interval)
    if abs(interval - n) < 1e-9 and n > 0:
        if 60 % n == 0:
            return {"second": set(range(0, 60, n))}
        if n % 60 == 0 and 60 % (n // 60) == 0:
            return {"second": {0}, "minute": set(range(0, 60, n // 60))}
        if n % 3600 == 0 and 24 % (n // 3600) == 0:
            return {"second": {0}, "minute": {0}, "hour": set(range(0, 24, n // 3600))}
    raise ConfigError(
        f"invalid setting RELAY_GC_INTERVAL_SECONDS (got {interval:g}): the worker's cron "
        "schedule needs whole seconds dividing a minute (1, 2, 3, 4, 5, 6, 10, 12, 15, 20, "
        "30), whole minutes dividing an hour (60, 120, 180, 240, 300, 360, 600, 720, 900, "
        "1200, 1800) or whole hours dividing a day (3600, 7200, ...)"
    )


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings, with a Retry: arq's pool has none of its own.

    Note: arq passes ``retry`` to plain connections only; with Sentinel its
    pool reconnects through the Sentinels but does not retry a failed command.
    """
    retry: dict[str, Any] = {
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), _RETRIES),
        "retry_on_error": [ConnectionError, TimeoutError],
        "conn_timeout": 2,
    }
    if settings.redis_sentinels:
        hosts = [_host_port(h) for h in settings.redis_sentinels.split(",") if h.strip()]
        if not hosts:
            raise ConfigError("invalid setting RELAY_REDIS_SENTINELS: no host:port given")
        return RedisSettings(
            host=hosts,
            sentinel=True,
            sentinel_master=settings.redis_master_name or "",
            **retry,
        )
    url = jobs.redis_url(settings) or jobs.DEFAULT_REDIS_URL
    try:
        parsed = RedisSettings.from_dsn(url)
        _ = urlparse(url).port  # raises ValueError on a bad port
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(
            f"invalid setting RELAY_REDIS_URL (got {url!r}): {exc}; "
            "expected redis://host:port/db, rediss://... or unix://..."
        ) from None
    for key, value in retry.items():
        setattr(parsed, key, value)
    return parsed


def redis_pool(settings: Settings) -> ArqRedis:
    """arq's own Redis client, as patient as the relay's (``relay.connections``).

    arq builds a client from ``redis_settings`` that gives up at the first
    connection error once connected: its poll loop then raises and the
    worker process exits, on every Redis restart or Sentinel failover (arq
    passes no retry at all to a Sentinel pool). Handing arq this client
    instead keeps the worker running: a command waits for the (new) master
    for up to the relay's retry budget. ``redis_settings`` stays in the
    options for arq's log line and for callers that read it.
    """
    if settings.redis_sentinels:
        client = patient_master(
            settings.redis_sentinels, settings.redis_master_name or "", redis_class=ArqRedis
        )
    else:
        client = patient_url(
            jobs.redis_url(settings) or jobs.DEFAULT_REDIS_URL, redis_class=ArqRedis
        )
    pool: ArqRedis = client
    pool.default_queue_name = f"arq:queue:{settings.redis_prefix}"
    return pool


def gc_cron(settings: Settings) -> CronJob:
    """The sweep's cron job, every ``gc_interval_seconds``."""
    return cron(
        jobs.gc_sweep,
        name=f"gc_sweep:{settings.redis_prefix}",
        keep_result=KEEP_RESULT_SECONDS,
        unique=True,
        **cron_fields(settings.gc_interval_seconds),  # type: ignore[arg-type]
    )


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``arq.worker.Worker`` for these settings."""
    return {
        "functions": [],
        "cron_jobs": [gc_cron(settings)],
        "redis_settings": redis_settings(settings),
        "redis_pool": redis_pool(settings),
        "queue_name": f"arq:queue:{settings.redis_prefix}",
        "on_startup": jobs.startup,
        "on_shutdown": jobs.shutdown,
        "ctx": {"settings": settings},
        # Our sweep logs one line per job; arq's result line would repeat it.
        "log_results": False,
    }


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"invalid setting RELAY_REDIS_SENTINELS: {text!r} is not host:port")
    return host, int(port)


class _JobLineFilter(logging.Filter):
    """Drop arq's per-job start and finish lines (each job logs its own one
    line); keep its retry, abort and failure lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return not (isinstance(msg, str) and msg.startswith(("%6.2fs → ", "%6.2fs ← ")))


def quiet_arq_job_lines() -> None:
    logging.getLogger("arq.worker").addFilter(_JobLineFilter())


def _build_worker_settings() -> type:
    options = worker_options(load_settings())
    quiet_arq_job_lines()
    return type("WorkerSettings", (), {"__doc__": "arq settings from RELAY_*.", **options})


_built: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for ``arq worker.settings.WorkerSettings``, built
    from the environment when first asked for (a ConfigError names the bad
    setting)."""
    if name == "WorkerSettings":
        if name not in _built:
            _built[name] = _build_worker_settings()
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
