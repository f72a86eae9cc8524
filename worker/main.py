"""The worker process: arq's Worker on uvloop, restarted while Redis is unreachable (arq's
poll loop dies when Redis goes away; a worker must outlive an outage)."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvloop
from arq.worker import Worker

from service.config import Settings
from service.core.errors import redis_unavailable
from worker.poll import run_polling
from worker.settings import FlushWorker, worker_settings

log = logging.getLogger("wbcache.worker")


def run(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT."""
    if settings.cluster and not settings.arq_redis_url:
        run_polling(settings)
        return
    stopped = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True

    delay = 0.5
    while True:
        # uvloop, as the API runs on: arq takes the current loop (the stock loop's socket
        # writes and selector cost the flush path ~15 % of its CPU in a py-spy profile).
        asyncio.set_event_loop(uvloop.new_event_loop())
        w = FlushWorker(**worker_settings(settings))

        def stop_claiming(_: object, w: Worker = w) -> None:
            # On SIGTERM/SIGINT: no new batches; running ones finish or are handed back.
            nonlocal stopped
            stopped = True
            flusher = w.ctx.get("flusher")
            if flusher is not None:
                flusher.stopping = True

        w.on_stop = stop_claiming
        try:
            w.run()
            return
        except Exception as exc:
            # arq's poll loop dies when Redis goes away; a worker must outlive an outage.
            if stopped or not redis_unavailable(exc):
                raise
            log.warning("Redis is unreachable (%s); restarting the worker in %.1f s", exc, delay)
        for sig in (signal.SIGINT, signal.SIGTERM):
            w.loop.remove_signal_handler(sig)
            signal.signal(sig, on_signal)
        w.loop.close()
        deadline = time.monotonic() + delay
        while not stopped and time.monotonic() < deadline:
            time.sleep(0.05)
        if stopped:
            return
        delay = min(5.0, delay * 2)
