"""The startup check of the contract's Redis section: are accepted writes at risk?"""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import ResponseError

log = logging.getLogger("wbcache.redis_check")

SAFE_POLICIES = {"noeviction", "volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random"}


async def check_redis_durability(redis: Redis, min_replicas: int = 0) -> list[str]:
    """Warn (and return the warnings) when Redis' settings put accepted writes at risk, or
    when fewer replicas are connected than REDIS_MIN_REPLICAS (``min_replicas``) asks for."""
    warnings = await _check_config(redis)
    if min_replicas:
        warnings += await _check_replicas(redis, min_replicas)
    for w in warnings:
        log.warning(w)
    return warnings


async def _check_replicas(redis: Redis, min_replicas: int) -> list[str]:
    try:
        info = await redis.info("replication")
    except ResponseError as exc:
        return [f"could not count the Redis replicas (INFO refused: {exc})"]
    connected = int(info.get("connected_slaves", 0))
    if connected >= min_replicas:
        return []
    return [
        f"REDIS_MIN_REPLICAS is {min_replicas} but Redis has {connected} connected "
        "replica(s): every write answers 503 replicas_unconfirmed (after "
        "REDIS_REPLICA_TIMEOUT_MS) until enough replicas connect."
    ]


async def _check_config(redis: Redis) -> list[str]:
    warnings: list[str] = []
    try:
        aof = await redis.config_get("appendonly")
        policy = await redis.config_get("maxmemory-policy")
        fsync = await redis.config_get("appendfsync")
    except ResponseError as exc:
        msg = (
            f"could not check Redis durability settings (CONFIG GET refused: {exc}); "
            "make sure appendonly is yes and maxmemory-policy is volatile-* or noeviction"
        )
        return [msg]
    if aof.get("appendonly") != "yes":
        warnings.append(
            "Redis runs with appendonly no: a Redis restart loses every write not yet "
            "persisted to Postgres. Set appendonly yes."
        )
    pol = policy.get("maxmemory-policy", "")
    if pol and pol not in SAFE_POLICIES:
        warnings.append(
            f"Redis maxmemory-policy is {pol}: it may evict entries holding writes not yet "
            "persisted. Use volatile-lru, volatile-ttl or noeviction."
        )
    if aof.get("appendonly") == "yes" and fsync.get("appendfsync") == "no":
        warnings.append(
            "Redis appendfsync is no: a crash of the Redis host can lose many seconds of "
            "acknowledged writes. Use everysec (about 1 s at risk) or always."
        )
    return warnings
