"""Wake tasks: bring a hibernating backend up before the relay sends it work.

A wake runs the provider's recipe (one HTTP request, a program, or vLLM's
``POST /wake_up``), then polls the backend's health until it answers or
``maxWaitSeconds`` pass. Model loading can take minutes, so every poll also
sends a heartbeat: the relay must not expire the session meanwhile.

Programs run through ``create_subprocess_exec``, never a shell: the config
is data, and a shell would turn a provider name or argument into code.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
from collections.abc import Awaitable, Callable

import aiohttp

from relay import wire

from .config import WakeCommand, WakeHttp, WakeVllm
from .httpclient import dumps
from .runner import ProviderRuntime

__all__ = ["WakeFailed", "Waker", "max_wait"]

log = logging.getLogger(__name__)

Heartbeat = Callable[[], Awaitable[None]]
OUTPUT_LIMIT = 2000
"""Characters of a failed recipe's output quoted in the error."""


class WakeFailed(Exception):
    """The recipe failed; the message says how, with its output."""


def max_wait(provider: ProviderRuntime) -> float | None:
    """Seconds a wake may take end to end (announced to the relay at
    registration so its wake deadline fits the recipe)."""
    wake = provider.config.wake
    return None if wake is None else wake.timeout_seconds + wake.max_wait_seconds


def _tail(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace").strip()
    return text if len(text) <= OUTPUT_LIMIT else "..." + text[-OUTPUT_LIMIT:]


class Waker:
    """Runs wake tasks; concurrent wakes of one provider share one attempt."""

    def __init__(
        self,
        heartbeat: Heartbeat,
        http: aiohttp.ClientSession,
        *,
        poll_interval: float = 1.0,
        health_timeout: float = 5.0,
    ) -> None:
        self._heartbeat = heartbeat
        self._http = http
        self._poll_interval = poll_interval
        self._health_timeout = health_timeout
        self._running: dict[str, asyncio.Task[wire.ResultPost]] = {}

    async def wake(self, provider: ProviderRuntime, task_id: str) -> wire.ResultPost:
        """Answer a wake task: ``{"status": 200, "body": {"ok", "ms"}}`` or
        ``{"error": ...}``."""
        attempt = self._running.get(provider.name)
        if attempt is None:
            attempt = asyncio.create_task(self._wake(provider, task_id))
            self._running[provider.name] = attempt
            attempt.add_done_callback(lambda _: self._running.pop(provider.name, None))
        else:
            log.info("task %s: provider %s is already waking, sharing that", task_id, provider.name)
        return await asyncio.shield(attempt)

    async def close(self) -> None:
        """Abandon wakes still running (the agent is stopping)."""
        attempts = list(self._running.values())
        for attempt in attempts:
            attempt.cancel()
        if attempts:
            await asyncio.wait(attempts)

    async def _wake(self, provider: ProviderRuntime, task_id: str) -> wire.ResultPost:
        started = time.monotonic()
        recipe = provider.config.wake
        up, why = await provider.backend.available(within=self._health_timeout)
        if up:
            log.info("task %s: provider %s is already up", task_id, provider.name)
            return {"status": 200, "body": {"ok": True, "ms": _ms(started)}}
        if recipe is None:
            return {
                "error": f"provider {provider.name} has no wake recipe and its backend is not "
                f"available: {why}"
            }
        log.info("task %s: waking provider %s (%s; %s)", task_id, provider.name, recipe.type, why)
        try:
            if isinstance(recipe, WakeHttp):
                await self._http_recipe(recipe.method, recipe.url, recipe, recipe.headers)
            elif isinstance(recipe, WakeVllm):
                key = provider.config.api_key
                auth = {"Authorization": f"Bearer {key}"} if key else {}
                url = provider.backend.base_url + "/wake_up"
                await self._http_recipe("POST", url, recipe, auth)
            else:
                await self._command_recipe(recipe)
        except WakeFailed as exc:
            error = f"waking provider {provider.name} failed: {exc}"
            log.warning("task %s: %s", task_id, error)
            return {"error": error}
        ready = time.monotonic()
        deadline = ready + recipe.max_wait_seconds
        while True:
            remaining = deadline - time.monotonic()
            checked, _ = await asyncio.gather(
                provider.backend.available(within=max(0.05, min(self._health_timeout, remaining))),
                self._heartbeat(),
            )
            up, why = checked
            if up:
                ms = _ms(started)
                log.info("task %s: provider %s is awake after %d ms", task_id, provider.name, ms)
                return {"status": 200, "body": {"ok": True, "ms": ms}}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                error = (
                    f"provider {provider.name}: backend at {provider.backend.base_url} not "
                    f"available {recipe.max_wait_seconds:g} s after the wake recipe ran "
                    f"(last check: {why})"
                )
                log.warning("task %s: %s", task_id, error)
                return {"error": error}
            await asyncio.sleep(min(self._poll_interval, remaining))

    async def _http_recipe(
        self,
        method: str,
        url: str,
        recipe: WakeHttp | WakeVllm,
        headers: dict[str, str] | None = None,
    ) -> None:
        body = recipe.body if isinstance(recipe, WakeHttp) else None
        sent = dict(headers or {})
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else dumps(body)
            if not isinstance(body, str):
                sent.setdefault("Content-Type", "application/json")
        try:
            async with self._http.request(
                method,
                url,
                data=data,
                headers=sent,
                timeout=aiohttp.ClientTimeout(total=recipe.timeout_seconds),
            ) as resp:
                text = _tail(await resp.read())
                if not 200 <= resp.status < 300:
                    raise WakeFailed(f"{method} {url} answered {resp.status}: {text}")
        except TimeoutError:
            raise WakeFailed(
                f"{method} {url} did not answer within {recipe.timeout_seconds:g} s"
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise WakeFailed(f"{method} {url} failed: {exc or type(exc).__name__}") from None

    async def _command_recipe(self, recipe: WakeCommand) -> None:
        shown = shlex.join([recipe.command, *recipe.args])
        try:
            proc = await asyncio.create_subprocess_exec(
                recipe.command,
                *recipe.args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise WakeFailed(f"cannot run `{shown}`: {exc.strerror or exc}") from None
        try:
            async with asyncio.timeout(recipe.timeout_seconds):
                output, _ = await proc.communicate()
        except TimeoutError:
            raise WakeFailed(
                f"`{shown}` did not finish within {recipe.timeout_seconds:g} s (killed)"
            ) from None
        finally:
            if proc.returncode is None:  # timed out or cancelled: do not leave it behind
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            text = _tail(output)
            raise WakeFailed(
                f"`{shown}` exited with code {proc.returncode}" + (f": {text}" if text else "")
            )


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)
