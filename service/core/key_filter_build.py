"""Completing the key filters (service/core/key_filter.py): a worker's job, on its sweep,
whenever a shard's filter is missing (first start, Redis' data lost) or incomplete."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

from redis.asyncio.cluster import RedisCluster

from service.adapters.postgres import PgPool
from service.adapters.redis import AnyRedis
from service.core import repository
from service.core.key_filter import KeyFilter
from service.core.scripts import Scripts
from service.core.shards import Shards

log = logging.getLogger("wbcache.keyfilter")

# The build's lock: renewed as it reads Postgres, so a dead builder holds it this long.
LOCK_MS = 60_000


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def incomplete(
    redis: AnyRedis, shards: Shards, key_filter: KeyFilter, run_id: str
) -> list[int]:
    """The shards whose filter lacks its complete bit or was completed on another server
    than the one with ``run_id`` (a failover, a restart)."""
    async with redis.pipeline(transaction=False) as pipe:
        for k in shards:
            pipe.getbit(key_filter.key(k), key_filter.complete_bit)
            pipe.get(key_filter.origin(k))
        replies = await pipe.execute()
    return [
        i
        for i, (bit, origin) in enumerate(zip(replies[::2], replies[1::2], strict=True))
        if not bit or _s(origin or b"") != run_id
    ]


async def server_run_id(redis: AnyRedis) -> str:
    """The run_id of the (standalone or primary) Redis server ``redis`` talks to."""
    info: dict[str, Any] = await redis.info("server")
    return str(info.get("run_id", ""))


# The most of a Redis' maxmemory a filter may take: a filter sized for far more keys than
# a small Redis holds would leave no room for the cache (and, at maxmemory, for writes).
MAX_SHARE = 0.1
_warned = False


async def _room_for(redis: AnyRedis, key_filter: KeyFilter) -> bool:
    """Whether the Redis has room for a filter: no maxmemory, or
    the filter within MAX_SHARE of it. Says why not once per process."""
    global _warned
    info: dict[str, Any] = await redis.info("memory")
    limit = int(info.get("maxmemory", 0))
    needed = key_filter.bits // 8 + 1
    if not limit or needed <= limit * MAX_SHARE:
        return True
    if not _warned:
        _warned = True
        log.warning(
            "key filter not built: KEY_FILTER_CAPACITY needs %.1f MB per shard, more than "
            "%d%% of Redis' maxmemory (%.1f MB); writes to uncached keys read Postgres. "
            "Lower KEY_FILTER_CAPACITY or raise maxmemory.",
            needed / 1e6,
            MAX_SHARE * 100,
            limit / 1e6,
        )
    return False


async def complete_filters(
    redis: AnyRedis, pg: PgPool, shards: Shards, key_filter: KeyFilter, scripts: Scripts
) -> list[int]:
    """Build every incomplete shard filter; returns the shards completed (none when all
    are complete, there is no filter, or another worker is building)."""
    if not key_filter.enabled:
        return []
    if isinstance(redis, RedisCluster):
        return []  # no filter on a Cluster yet (KeyFilter.from_settings)
    run_id = await server_run_id(redis)
    todo = await incomplete(redis, shards, key_filter, run_id)
    if not todo or not await _room_for(redis, key_filter):
        return []
    lock, token = shards.any.key_filter_lock, uuid.uuid4().hex
    if not await redis.set(lock, token, nx=True, px=LOCK_MS):
        return []
    started = time.monotonic()
    try:
        # From here on the bitmaps exist, so every write sets its key's bits (a bitmap
        # completed on another server keeps what it holds: keys that were written).
        async with redis.pipeline(transaction=False) as pipe:
            for i in todo:
                pipe.setbit(key_filter.key(shards[i]), key_filter.complete_bit, 0)
            await pipe.execute()
        built = {i: key_filter.bitmap(()) for i in todo}

        def add(m: str) -> None:
            bitmap = built.get(shards.index(m))
            if bitmap is not None:
                key_filter.add(bitmap, m)

        # Queued writes from before the bitmaps existed: each has an entry until flushed.
        async for raw in redis.scan_iter(match=shards.entries_pattern(), count=1000):
            m = shards.member_of_entry(_s(raw))
            if m is not None:
                add(m)
        # Then Postgres, after: what was flushed meanwhile had its entry until committed.
        keys = 0
        async for chunk in repository.all_keys(await pg.get()):
            for m in chunk:
                add(m)
            keys += len(chunk)
            await redis.pexpire(lock, LOCK_MS)
        for i, bitmap in built.items():
            k = shards[i]
            await scripts.key_filter(
                keys=[
                    key_filter.key(k),
                    k.key_filter_scratch(key_filter.bits),
                    key_filter.origin(k),
                ],
                args=[bytes(bitmap), key_filter.complete_bit, run_id],
            )
        log.info(
            "key filter complete in %d shard(s): %d keys from Postgres in %.1f s",
            len(built),
            keys,
            time.monotonic() - started,
        )
        return sorted(built)
    finally:
        with contextlib.suppress(Exception):  # a Redis outage: the lock runs out instead
            if _s(await redis.get(lock) or b"") == token:
                await redis.delete(lock)
