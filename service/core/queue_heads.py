"""Where the write queue stands, read in one round trip: Redis' clock and each shard's
oldest dirty mark (and earliest lease expiry), for the flush path's "what is due when"."""

from __future__ import annotations

from typing import Any

from redis.asyncio.cluster import RedisCluster

from service.adapters.redis import AnyRedis
from service.core.shards import Shards


async def clock_and_heads(
    redis: AnyRedis, shards: Shards, with_leases: bool
) -> tuple[int, list[Any]]:
    """Redis' clock (ms) and, per shard, its oldest dirty mark (and its earliest lease
    expiry): one round trip on one Redis. A Cluster pipeline refuses TIME (it has no
    key to route by), so there TIME goes first, on its own, to any node."""
    cluster = isinstance(redis, RedisCluster)
    async with redis.pipeline(transaction=False) as pipe:
        if not cluster:
            pipe.time()
        for k in shards:
            pipe.zrange(k.dirty, 0, 0, withscores=True)
            if with_leases:
                pipe.zrange(k.leases, 0, 0, withscores=True)
        if cluster:
            seconds, micros = await redis.time()
            firsts: list[Any] = await pipe.execute()
        else:
            (seconds, micros), *firsts = await pipe.execute()
    return int(seconds) * 1000 + int(micros) // 1000, firsts
