"""WorkerSettings for arq, built from the service settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from arq import cron
from arq.connections import RedisSettings
from arq.worker import Worker, func

from service.adapters.arq import FLUSH_JOB, use_prefix
from service.adapters.postgres import PgPool
from service.adapters.redis import close_redis, connect_redis
from service.adapters.redis_check import check_redis_durability
from service.adapters.redis_url import is_sentinel_url, parse_sentinel_url
from service.config import Settings, get_settings
from service.core import stats
from service.core.errors import classify
from service.core.flusher import Flusher
from service.core.scripts import Scripts
from service.core.shards import Shards
from worker.flush import SweepState, drain, flush, sweep
from worker.purge import Purger

log = logging.getLogger("wbcache.worker")

HEARTBEAT_SECONDS = 5.0


async def _heartbeat(ctx: dict[str, Any]) -> None:
    flusher: Flusher = ctx["flusher"]
    period = min(HEARTBEAT_SECONDS, flusher.settings.lease_seconds / 3)
    while True:
        try:
            # One script, on Redis' clock (which /v1/stats compares heartbeats with), that
            # Redis runs even at maxmemory.
            await flusher.renew_leases(ctx["worker_id"])
            Path(flusher.settings.worker_heartbeat_file).touch()
        except Exception as exc:
            log.debug("heartbeat failed: %s", exc)
        await asyncio.sleep(period)


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx.get("settings") or get_settings()
    redis = connect_redis("worker", settings)
    pg = PgPool("worker", settings)
    ctx["worker_id"] = f"{uuid.uuid4().hex[:12]}"
    ctx["redis_client"] = redis
    # arq's own client (REDIS_URL's Redis, or a Cluster's ARQ_REDIS_URL) enqueues the
    # wake-ups; a polling worker (worker/poll.py) has none.
    ctx["arq"] = ctx.get("redis")
    ctx["pg"] = pg
    ctx["flusher"] = Flusher(redis, pg, settings, Scripts.register(redis))
    ctx["flush_lock"] = asyncio.Lock()
    ctx["sweep_state"] = SweepState()
    with contextlib.suppress(Exception):
        await check_redis_durability(redis)
    with contextlib.suppress(Exception):  # Redis down: the next start, or the API, marks it
        await stats.mark_served(redis, Shards.from_settings(settings))
    ctx["heartbeat"] = asyncio.create_task(_heartbeat(ctx))
    if settings.purges_edges:  # this worker also drains the edge purge queue
        ctx["purger"] = asyncio.create_task(Purger(redis, settings).run())
    log.info("worker %s started", ctx["worker_id"])


async def shutdown(ctx: dict[str, Any]) -> None:
    # A worker stopped while starting up (its startup cancelled) has only part of ctx.
    # Cancelled and waited for: a task stopped mid-command must give its connection back
    # before the pools close.
    sweep_state: SweepState | None = ctx.get("sweep_state")
    build = sweep_state.key_filter_build if sweep_state is not None else None
    tasks: list[asyncio.Task[Any]] = [
        t for t in (ctx.get("heartbeat"), ctx.get("purger"), build) if t is not None
    ]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    flusher: Flusher | None = ctx.get("flusher")
    if flusher is None:
        return
    flusher.stopping = True
    try:
        await flusher.hand_back_all()
    except Exception as exc:  # their leases run out instead
        log.warning("could not hand back batches at shutdown: %s", exc)
    with contextlib.suppress(Exception):
        await flusher.redis.zrem(flusher.keys.workers, ctx["worker_id"])
    await ctx["pg"].close()
    await close_redis(ctx["redis_client"])
    # arq closes its own pool after this, but never the connections its Sentinel client
    # opened to the Sentinels (redis+sentinel:// URLs): close those here.
    arq_pool = getattr(ctx.get("redis"), "connection_pool", None)
    for sentinel in getattr(getattr(arq_pool, "sentinel_manager", None), "sentinels", ()):
        with contextlib.suppress(Exception):
            await sentinel.aclose()
    log.info("worker %s stopped", ctx["worker_id"])


class FlushWorker(Worker):
    """arq's Worker, except that closing waits for the cancelled jobs without re-raising
    their CancelledError. arq's close() gathers them plainly: a job cancelled by SIGTERM
    while arq records its result re-raises there, which skips on_shutdown (the hand-back
    of held batches) and makes a clean SIGTERM exit 1 (seen in test_shutdown)."""

    async def close(self) -> None:
        if self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            self.tasks.clear()
        await super().close()

    _full_logged_at = 0.0

    async def _poll_iteration(self) -> None:
        """arq's poll, except at maxmemory: Redis then refuses arq's own writes (the
        in-progress mark that starts a job, cron enqueues, the health key), so no flush job
        can start and arq's poll loop would die. Drain from here instead: claim and release
        run even at maxmemory, and each release makes the flushed entries evictable, which
        is what lets Redis accept writes (and arq start jobs) again."""
        try:
            await super()._poll_iteration()
        except Exception as exc:
            unavailable = classify(exc)
            if unavailable is None or unavailable.code != "redis_full":
                raise
            now = time.monotonic()
            if now - self._full_logged_at >= 30:
                self._full_logged_at = now
                log.warning("Redis is at maxmemory (%s): draining without arq jobs", exc)
            await drain(self.ctx, scheduling=False)


def arq_redis_settings(url: str) -> RedisSettings:
    """arq's own connection (its polling and job bookkeeping): through the Sentinels, to the
    primary they name, for a ``redis+sentinel://`` URL (arq follows a failover itself; the
    restart loop in worker/main.py covers the moments without a primary)."""
    if not is_sentinel_url(url):
        return RedisSettings.from_dsn(url)
    parsed = parse_sentinel_url(url)
    return RedisSettings(
        host=list(parsed.sentinels),
        sentinel=True,
        sentinel_master=parsed.master,
        database=parsed.db,
        username=parsed.username,
        password=parsed.password,
        conn_timeout=2,
    )


def worker_settings(settings: Settings | None = None) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker``."""
    settings = settings or get_settings()
    keys = Shards.from_settings(settings).any
    use_prefix(settings.redis_prefix)
    sweep_seconds = max(1, min(30, settings.sweep_seconds))
    return {
        "functions": [func(flush, name=FLUSH_JOB, keep_result=0, timeout=None, max_tries=1)],
        "cron_jobs": [
            cron(
                sweep,
                second=set(range(0, 60, sweep_seconds)),
                run_at_startup=True,
                unique=True,
                keep_result=0,
                timeout=None,
            )
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": arq_redis_settings(
            settings.arq_redis_url
            if settings.cluster and settings.arq_redis_url
            else settings.redis_url
        ),
        "queue_name": keys.arq_queue,
        "health_check_key": f"{keys.prefix}arq:health-check",
        "ctx": {"settings": settings},
        "max_jobs": 4,
        "keep_result": 0,
        "poll_delay": 0.1,
        "handle_signals": True,
    }
