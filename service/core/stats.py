"""Queue and cache numbers, read from Redis in one round trip; the same numbers feed
/v1/stats, /metrics, ``wbcache status`` and the dashboard."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from redis.asyncio import Redis

from service.adapters.redis import AnyRedis
from service.core.redis_keys import Keys
from service.core.shards import Shards

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


async def pending_by_collection(redis: AnyRedis, shards: Shards) -> dict[str, Any]:
    """Pending keys per collection (dirty + in flight), added up over the shards (asked
    at once: on a Cluster, each node answers its shards in parallel)."""
    counts: dict[str, int] = {}
    exact = True
    per_shard = await asyncio.gather(*(_shard_pending_by_collection(redis, k) for k in shards))
    for shard in per_shard:
        exact = exact and shard["exact"]
        for collection, n in shard["counts"].items():
            counts[collection] = counts.get(collection, 0) + n
    return {"counts": dict(sorted(counts.items())), "exact": exact}


async def _shard_pending_by_collection(redis: AnyRedis, keys: Keys) -> dict[str, Any]:
    """Pending keys per collection (dirty + in flight) of one shard, from the counts the
    scripts keep (``Keys.pending_counts``): O(collections), whatever the queue's size.
    ``exact`` is True when they add up to ``pending``, read at the same moment; otherwise (a
    queue older than the counts, until it drains) the members are counted instead, exactly
    up to PER_COLLECTION_LIMIT keys."""
    # EVAL, not EVALSHA: this read must not depend on the node's script cache, which a
    # slot's new owner may lack mid-resharding (redis-py's SCRIPT LOAD can miss it while
    # it follows ASK), and the script is short.
    flat, dirty_total, inflight_total = await redis.eval(  # type: ignore[misc]
        _PENDING_COUNTS, 3, keys.pending_counts, keys.dirty, keys.inflight
    )
    pairs = zip(flat[::2], flat[1::2], strict=True)
    counts = {c.decode(): int(n) for c, n in pairs if int(n) > 0}
    if sum(counts.values()) == dirty_total + inflight_total:
        return {"counts": dict(sorted(counts.items())), "exact": True}
    return await _count_members(redis, keys)


async def _count_members(redis: AnyRedis, keys: Keys) -> dict[str, Any]:
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


def _mean(counters: dict[str, float], histogram: str) -> float | None:
    count = counters.get(f"{histogram}:count", 0)
    return round(counters.get(f"{histogram}:sum", 0) / count, 4) if count else None


async def redis_now_ms(redis: AnyRedis) -> int:
    """Redis' clock in ms: the one clock every process compares times with (the scripts
    stamp dirty marks, leases and the flush log with ``TIME``; workers their heartbeats)."""
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


# What collect reads of each shard, in its pipeline's order.
_PER_SHARD = 9


async def mark_served(redis: AnyRedis, shards: Shards) -> None:
    """Note on Redis that the service uses it (``Keys.served``), at an API's or worker's
    start."""
    await redis.set(shards.any.served, int(time.time() * 1000), nx=True)


async def served(redis: AnyRedis, shards: Shards) -> bool:
    """Whether an API or worker of the service ever used this Redis (``collect``'s
    ``served``)."""
    if await redis.exists(shards.any.served):
        return True
    return bool((await collect(redis, shards))["served"])


async def collect(
    redis: AnyRedis, shards: Shards, raw_counters: bool = False, arq: Redis | None = None
) -> dict[str, Any]:
    """The numbers of every shard, added up (pending, counters, flush log), in one round
    trip (one per node on a Cluster). ``arq``: where flush wake-up jobs queue, if not
    REDIS_URL's Redis (a Cluster's ARQ_REDIS_URL); on a Cluster without it, none queue."""
    # Redis' clock, which stamps dirty marks, batch ages, heartbeats and the flush log: an
    # API host's skewed clock must not make live workers look dead or ages look wrong.
    now = await redis_now_ms(redis)
    keys = shards.any
    # arq's queue is read in the same round trip when it lives in REDIS_URL's Redis.
    queue_here = arq is None and isinstance(redis, Redis)
    async with redis.pipeline(transaction=False) as pipe:
        for k in shards:
            pipe.zcard(k.dirty)
            pipe.hlen(k.inflight)
            pipe.zrange(k.dirty, 0, 0, withscores=True)
            pipe.zrange(k.batch_age, 0, 0, withscores=True)
            pipe.hlen(k.dead)
            pipe.hgetall(k.counters)
            pipe.zcard(k.leases)
            pipe.zrangebyscore(k.flush_log, now - 60_000, "+inf")
            pipe.zcard(k.purge_queue)
        pipe.zrangebyscore(keys.workers, now - WORKER_ALIVE_MS, "+inf", withscores=True)
        pipe.get(keys.last_error)
        pipe.exists(keys.served)
        if queue_here:
            pipe.zcard(keys.arq_queue)
        results = await pipe.execute()
    queued = results.pop() if queue_here else 0
    if arq is not None:
        queued = await arq.zcard(keys.arq_queue)
    workers, last_error, served = results[-3:]
    dirty = inflight = dead = batches = purges = 0
    oldest: list[int] = []
    counters: dict[str, float] = {}
    recent: list[bytes] = []
    for i in range(0, len(results) - 3, _PER_SHARD):
        d, f, oldest_dirty, oldest_batch, dl, counters_raw, b, r, pq = results[i : i + _PER_SHARD]
        dirty, inflight, dead, batches = dirty + d, inflight + f, dead + dl, batches + b
        purges += pq
        oldest += [int(s) for _, s in (oldest_dirty + oldest_batch)]
        for name, value in counters_raw.items():
            counters[name.decode()] = counters.get(name.decode(), 0) + _number(value)
        recent += r
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
        # Whether an API or worker of the service ever used this Redis (under this prefix).
        "served": bool(served or dirty or inflight or dead or workers),
        # The edge (docs/edge.md): purges queued (first and second ones, and those being
        # retried while an edge is down), first purges confirmed, failed purge rounds, and
        # the mean time from a write to its purge's confirmation (histogram on /metrics).
        "edge_purges_pending": purges,
        "edge_purges": counters.get("edge_purges", 0),
        "edge_purge_failures": counters.get("edge_purge_failures", 0),
        "edge_purge_latency_mean_s": _mean(counters, "edge_purge_latency_seconds"),
    }
    if raw_counters:
        out["raw_counters"] = counters
    return out
