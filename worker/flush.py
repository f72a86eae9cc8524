"""arq job functions. Jobs carry no data: each wakes this process' flusher, which drains
every ready batch; the cron sweep is the safety net for lost or failed wake-ups and takes
over batches whose worker died (their lease ran out)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis

from service.adapters.arq import schedule_flush
from service.core import repository
from service.core.flusher import Flusher
from service.core.key_filter_build import complete_filters

log = logging.getLogger("wbcache.worker")


async def drain(ctx: dict[str, Any], scheduling: bool = True) -> int:
    """Flush whatever is ready; then, if ``scheduling``, enqueue a wake-up for what is not
    (a Redis at maxmemory refuses that enqueue: the worker's poll loop drains instead; a
    worker without arq, on a Cluster, polls)."""
    flusher: Flusher = ctx["flusher"]
    lock: asyncio.Lock = ctx["flush_lock"]
    arq: ArqRedis | None = ctx.get("arq")
    if lock.locked():
        return 0  # this process is already draining; it will see the new work
    async with lock:
        async with flusher.redis.pipeline(transaction=False) as pipe:
            for k in flusher.shards:
                pipe.delete(k.wake)
            await pipe.execute()
        flushed = 0
        while True:
            flushed += await flusher.drain_ready()
            wait_ms = await flusher.next_ready_in_ms()
            # Keep draining while work becomes due soon; otherwise go back to sleep. Wait at
            # least a fifth of the write delay between passes so that keys due at nearby
            # moments share a batch (one commit instead of dozens of tiny ones).
            if wait_ms is None or wait_ms > flusher.settings.write_delay_ms:
                break
            await asyncio.sleep(max(wait_ms, flusher.settings.write_delay_ms // 5) / 1000)
    if not scheduling or arq is None:
        return flushed
    # Outside the lock: a wake-up that arrived while we drained returned at once, so
    # schedule whatever is still dirty ourselves, and mark it scheduled in every shard so
    # that writes do not enqueue one each.
    wait_ms = await flusher.next_ready_in_ms()
    if wait_ms is not None:
        async with flusher.redis.pipeline(transaction=False) as pipe:
            for k in flusher.shards:
                pipe.set(k.wake, "1", px=flusher.settings.write_delay_ms + 5000)
            await pipe.execute()
        await schedule_flush(arq, flusher.keys, wait_ms)
    return flushed


async def flush(ctx: dict[str, Any]) -> int:
    return await drain(ctx)


@dataclass
class SweepState:
    """What sweeps keep from one to the next. In the worker's ctx from its startup: arq
    hands each job a copy of that dict, so a value set on the copy would be lost."""

    sweeps: int = 0
    key_filter_build: asyncio.Task[list[int]] | None = None


async def sweep(ctx: dict[str, Any]) -> int:
    flushed = await drain(ctx)
    state: SweepState = ctx["sweep_state"]
    state.sweeps += 1
    build = state.key_filter_build
    if build is None or build.done():
        # In the background: a build reads every key in Postgres (seconds per million).
        state.key_filter_build = asyncio.create_task(_complete_key_filters(ctx["flusher"]))
    if state.sweeps % 720 == 1:  # about hourly: forget deletes older than the retention
        flusher: Flusher = ctx["flusher"]
        try:
            pool = await flusher.pg.get()
            removed = await repository.gc_tombstones(
                pool, flusher.settings.tombstone_retention_days
            )
            if removed:
                log.info("collected %d old tombstones", removed)
        except Exception as exc:
            log.debug("tombstone collection skipped: %s", exc)
    return flushed


async def _complete_key_filters(flusher: Flusher) -> list[int]:
    try:
        return await complete_filters(
            flusher.redis, flusher.pg, flusher.shards, flusher.key_filter, flusher.scripts
        )
    except Exception as exc:  # the next sweep tries again; writes read Postgres meanwhile
        log.warning("could not complete the key filter: %s", exc)
        return []
