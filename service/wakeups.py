"""arq jobs are wake-ups that carry no data: the dirty set in Redis is the queue. A lost
or failed job only delays a flush until the periodic sweep."""

from __future__ import annotations

from datetime import timedelta

from arq.connections import ArqRedis

from service.keys import Keys

FLUSH_JOB = "flush"


async def schedule_flush(redis: ArqRedis, keys: Keys, defer_ms: int) -> None:
    await redis.enqueue_job(
        FLUSH_JOB, _queue_name=keys.arq_queue, _defer_by=timedelta(milliseconds=defer_ms)
    )


async def arm_and_schedule(redis: ArqRedis, keys: Keys, defer_ms: int, wake_ttl_ms: int) -> None:
    """Schedule a flush and mark it scheduled, so writes do not enqueue one each."""
    await redis.set(keys.wake, "1", px=wake_ttl_ms)
    await schedule_flush(redis, keys, defer_ms)
