"""``relay publish``: run the publisher agent from a config file.

Exit codes: 0 after a clean stop (SIGINT/SIGTERM), 2 for a bad command line
or config file (the message names the file, entry and field).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from .agent import Agent
from .config import ConfigError, load_config

__all__ = ["main"]

log = logging.getLogger("relay.publisher")

EXIT_OK = 0
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay publish",
        description="Publish local OpenAI-compatible model servers on an LLM relay.",
    )
    parser.add_argument(
        "--config", "-c", required=True, help="providers YAML file (see relay/publisher/config.py)"
    )
    parser.add_argument("--relay-url", help="relay base URL (overrides RELAY_URL and the file)")
    parser.add_argument(
        "--token", help="publish token (overrides RELAY_TOKEN and the file; visible in ps)"
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, validate the config, run the agent until signalled."""
    parser = _parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse already printed why
        return exc.code if isinstance(exc.code, int) else EXIT_CONFIG
    try:
        config = load_config(args.config, relay_url=args.relay_url, token=args.token)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"relay publish: {line}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # aiohttp logs every refused backend connection at ERROR on its own; the
    # agent already reports them in one line per task.
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, logging.getLogger().level))
    return _run(_serve(Agent(config)))


def _run(main: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (it comes with uvicorn[standard]):
    every task costs the agent two HTTP exchanges and an SSE read, and
    uvloop's transports make those markedly cheaper than asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - plain asyncio works too
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def _serve(agent: Agent) -> int:
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(agent.run())
    stopper: asyncio.Task[None] | None = None

    def on_signal(signame: str) -> None:
        nonlocal stopper
        if stopper is None:
            log.info("%s received: shutting down (send it again to quit at once)", signame)
            stopper = asyncio.create_task(agent.stop())
        else:
            log.warning("%s received again: aborting running tasks", signame)
            agent.abort()

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - Windows
            pass
    try:
        await runner
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.remove_signal_handler(sig)
            except (NotImplementedError, RuntimeError):  # pragma: no cover
                pass
    return EXIT_OK
