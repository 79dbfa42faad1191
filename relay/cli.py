"""``relay serve | worker | publish``: one command for every process."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from relay.auth import TokensError
from relay.config import ConfigError, Settings, load_settings

log = logging.getLogger("relay.cli")

# How long a draining replica lets in-flight requests (long streams included)
# finish after SIGTERM before it closes them.
DRAIN_GRACE_SECONDS = 120


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay serve",
        description="Run one relay replica. Every flag has a RELAY_* environment equivalent.",
    )
    p.add_argument("--host", help="bind address (RELAY_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="bind port (RELAY_PORT, default 8080)")
    p.add_argument(
        "--redis-url", help="shared Redis; omit for the embedded store (RELAY_REDIS_URL)"
    )
    p.add_argument(
        "--redis-sentinels", help="host:port,... of Redis Sentinels (RELAY_REDIS_SENTINELS)"
    )
    p.add_argument("--redis-master-name", help="Sentinel master name (RELAY_REDIS_MASTER_NAME)")
    p.add_argument("--redis-prefix", help="key prefix (RELAY_REDIS_PREFIX, default relay)")
    p.add_argument("--replica-id", help="this replica's id (RELAY_REPLICA_ID, default random)")
    p.add_argument("--tokens-file", help="YAML/JSON list of tokens (RELAY_TOKENS_FILE)")
    p.add_argument(
        "--no-auth",
        action="store_const",
        const=True,
        help="accept every caller as 'anonymous' with all scopes: local play only (RELAY_NO_AUTH=1)",
    )
    p.add_argument(
        "--demo",
        action="store_const",
        const=True,
        help="also start a toy backend and a publisher for it, model name 'demo' (RELAY_DEMO=1)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (RELAY_LOG_LEVEL)")
    return p


def serve(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    try:
        settings = load_settings({k: v for k, v in vars(args).items()})
    except ConfigError as exc:
        print(f"relay serve: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return asyncio.run(_serve(settings))
    except TokensError as exc:
        print(f"relay serve: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


async def _serve(settings: Settings) -> int:
    import uvicorn

    from relay.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=DRAIN_GRACE_SECONDS,
        lifespan="on",
    )
    server = _DrainingServer(config)
    demo: Any = None
    if settings.demo:
        from relay.demo import Demo

        demo = Demo(settings, app.state.auth)
        server.on_started.append(demo.start)
    try:
        await server.serve()
    finally:
        if demo is not None:
            await demo.stop()
    return 0


class _DrainingServer:
    """uvicorn's Server, told to drain the relay before it stops: /readyz
    turns unready and publishers are asked to reconnect elsewhere, while
    requests in flight finish within the grace period."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        outer = self
        self.on_started: list[Any] = []

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: Any) -> None:
                relay = (
                    getattr(config.app.state, "relay", None)
                    if hasattr(config.app, "state")
                    else None
                )
                if relay is not None and not relay.draining:
                    loop = asyncio.get_event_loop()
                    loop.call_soon_threadsafe(relay.begin_drain)
                super().handle_exit(sig, frame)

            async def startup(self, sockets: Any = None) -> None:
                await super().startup(sockets)
                for hook in outer.on_started:
                    await hook(self)

        self._server = Server(config)

    async def serve(self) -> None:
        await self._server.serve()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: relay {serve,worker,publish} [options]   (relay COMMAND --help for each)"
    if not argv or argv[0] in {"-h", "--help"}:
        print(usage)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve(rest)
    if command == "worker":
        from worker.cli import main as worker_main

        return worker_main(rest)
    if command == "publish":
        from relay.publisher.cli import main as publish_main

        return publish_main(rest)
    print(f"relay: unknown command {command!r}\n{usage}", file=sys.stderr)
    return 2


_ = Settings  # re-exported for type checkers of callers

if __name__ == "__main__":
    sys.exit(main())
