"""Queue and cache numbers, read from Redis in one round trip; the same numbers feed
/v1/stats, /metrics, ``wbcache status`` and the dashboard."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from service.core.redis_keys import Keys

WORKER_ALIVE_MS = 15_000
# Pending per collection is counted from the members themselves, up to this many, only
# when the kept counts disagree with the queue (a queue left by a version without them).
PER_COLLECTION_LIMIT = 100_000


# The three reads at once, as a read-only script rather than MULTI/EXEC: Redis refuses
# every command queued in a transaction at maxmemory, even reads, but runs a no-writes
# script (/v1/stats must answer while Redis is full).
_PENDING_COUNTS = """#!lua flags=no-writes
return {redis.call('HGETALL', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('HLEN', KEYS[3])}
"""


async def pending_by_collection(redis: Redis, keys: Keys) -> dict[str, Any]:
    """Pending keys per collection (dirty + in flight), from the counts the scripts keep
    (``Keys.pending_counts``): O(collections), whatever the queue's size. ``exact`` is
    True when they add up to ``pending``, read at the same moment; otherwise (a
    queue older than the counts, until it drains) the members are counted instead, exactly
    up to PER_COLLECTION_LIMIT keys."""
    script = redis.register_script(_PENDING_COUNTS)
    flat, dirty_total, inflight_total = await script(
        keys=[keys.pending_counts, keys.dirty, keys.inflight]
    )
    pairs = zip(flat[::2], flat[1::2], strict=True)
    counts = {c.decode(): int(n) for c, n in pairs if int(n) > 0}
    if sum(counts.values()) == dirty_total + inflight_total:
        return {"counts": dict(sorted(counts.items())), "exact": True}
    return await _count_members(redis, keys)


async def _count_members(redis: Redis, keys: Keys) -> dict[str, Any]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrange(keys.dirty, 0, PER_COLLECTION_LIMIT - 1)
        pipe.zcard(keys.dirty)
        pipe.hlen(keys.inflight)
        dirty, dirty_total, inflight_total = await pipe.execute()
    members = list(dirty)
    if inflight_total <= PER_COLLECTION_LIMIT:
        members += await redis.hkeys(keys.inflight)  # type: ignore[misc]
    counts: dict[str, int] = {}
    for m in members:
        collection = m.split(b":", 1)[0].decode()
        counts[collection] = counts.get(collection, 0) + 1
    exact = dirty_total <= PER_COLLECTION_LIMIT and inflight_total <= PER_COLLECTION_LIMIT
    return {"counts": dict(sorted(counts.items())), "exact": exact}


def _number(raw: bytes) -> float:
    text = raw.decode()
    return int(text) if text.lstrip("-").isdigit() else float(text)


async def redis_now_ms(redis: Redis) -> int:
    """Redis' clock in ms: the one clock every process compares times with (the scripts
    stamp dirty marks, leases and the flush log with ``TIME``; workers their heartbeats)."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def collect(redis: Redis, keys: Keys, raw_counters: bool = False) -> dict[str, Any]:
    # Redis' clock, which stamps dirty marks, batch ages, heartbeats and the flush log: an
    # API host's skewed clock must not make live workers look dead or ages look wrong.
    now = await redis_now_ms(redis)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(keys.dirty)
        pipe.hlen(keys.inflight)
        pipe.zrange(keys.dirty, 0, 0, withscores=True)
        pipe.zrange(keys.batch_age, 0, 0, withscores=True)
        pipe.hlen(keys.dead)
        pipe.zrangebyscore(keys.workers, now - WORKER_ALIVE_MS, "+inf", withscores=True)
        pipe.hgetall(keys.counters)
        pipe.zcard(keys.arq_queue)
        pipe.zcard(keys.leases)
        pipe.zrangebyscore(keys.flush_log, now - 60_000, "+inf")
        pipe.get(keys.last_error)
        results = await pipe.execute()
    (
        dirty,
        inflight,
        oldest_dirty,
        oldest_batch,
        dead,
        workers,
        counters_raw,
        queued,
        batches,
        recent,
        last_error,
    ) = results

    oldest = [int(s) for _, s in (oldest_dirty + oldest_batch)]
    counters = {k.decode(): _number(v) for k, v in counters_raw.items()}
    hits, misses = counters.get("hits", 0), counters.get("misses", 0)
    flushed_last_minute = sum(int(m.split(b":")[1]) for m in recent)
    out = {
        "pending": dirty + inflight,
        "oldest_pending_age_s": round((now - min(oldest)) / 1000, 3) if oldest else None,
        "queued_jobs": queued,
        "batches_in_flight": batches,
        "dead_letters": dead,
        "workers": len(workers),
        "worker_heartbeats": {w.decode(): round((now - int(s)) / 1000, 3) for w, s in workers},
        "hits": hits,
        "misses": misses,
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "flushed": counters.get("flushed", 0),
        "flush_batches": counters.get("batches", 0),
        "flush_rate_per_s": round(flushed_last_minute / 60, 2),
        "flush_failures": counters.get("flush_failures", 0),
        "flush_retries": counters.get("flush_retries", 0),
        "dead_lettered_total": counters.get("dead_lettered", 0),
        "last_flush_error": orjson.loads(last_error) if last_error else None,
    }
    if raw_counters:
        out["raw_counters"] = counters
    return out
