"""The worker without arq, on a Redis Cluster without ARQ_REDIS_URL (arq has no Cluster
support): the same startup, drain and shutdown as the arq worker, driven by a loop that
looks at the shards' queues instead of waiting for wake-up jobs. It sleeps until the
oldest dirty key is due, at most POLL_SECONDS, so a write waits at most WRITE_DELAY_MS
plus that; each look is one pipeline (one round trip per Cluster node)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

import uvloop

from service.config import Settings
from service.core.errors import classify
from service.core.flusher import Flusher
from worker.flush import drain, sweep
from worker.settings import shutdown, startup

log = logging.getLogger("wbcache.worker")

POLL_SECONDS = 0.1


async def poll(settings: Settings, stop: asyncio.Event) -> None:
    """Drain the shards until ``stop`` is set; then hand held batches back."""
    ctx: dict[str, Any] = {"settings": settings}
    await startup(ctx)
    flusher: Flusher = ctx["flusher"]
    sweep_every = max(1, min(30, settings.sweep_seconds))
    next_sweep = 0.0
    delay = POLL_SECONDS

    async def stop_claiming() -> None:
        # Batches being flushed finish (or are handed back); no new ones are claimed.
        await stop.wait()
        flusher.stopping = True

    watcher = asyncio.create_task(stop_claiming())
    try:
        while not stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + sweep_every
                    await sweep(ctx)  # drains too; and, hourly, collects old tombstones
                else:
                    await drain(ctx, scheduling=False)
                wait_ms = await flusher.next_ready_in_ms()
                delay = POLL_SECONDS if wait_ms is None else min(POLL_SECONDS, wait_ms / 1000)
            except Exception as exc:
                if classify(exc) is None:
                    raise
                log.warning("Redis or Postgres unavailable (%s); polling again shortly", exc)
                delay = min(5.0, max(POLL_SECONDS, delay * 2))
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except TimeoutError:
                pass
    finally:
        watcher.cancel()
        await shutdown(ctx)


def run_polling(settings: Settings) -> None:
    """Run the polling worker until SIGTERM/SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await poll(settings, stop)

    log.info("polling the shards (a Cluster without ARQ_REDIS_URL)")
    uvloop.run(main())
