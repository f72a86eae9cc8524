"""The startup check of the contract's Redis section: are accepted writes at risk?"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import ResponseError

log = logging.getLogger("wbcache.redis_check")

SAFE_POLICIES = {"noeviction", "volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random"}


# One server's answer to a command: a standalone Redis, or one node of a Cluster.
Ask = Callable[..., Awaitable[Any]]


def _on_node(cluster: RedisCluster, node: ClusterNode) -> Ask:
    async def ask(*command: Any) -> Any:
        return await cluster.execute_command(*command, target_nodes=node)

    return ask


async def check_redis_durability(redis: Redis | RedisCluster, min_replicas: int = 0) -> list[str]:
    """Warn (and return the warnings) when Redis' settings put accepted writes at risk, or
    when fewer replicas are connected than REDIS_MIN_REPLICAS (``min_replicas``) asks for.
    On a Cluster, of each primary (the warnings name it)."""
    warnings: list[str] = []
    if isinstance(redis, RedisCluster):
        await redis.initialize()
        for node in redis.get_primaries():
            ask = _on_node(redis, node)
            found = await _check_config(ask)
            if min_replicas:
                found += await _check_replicas(ask, min_replicas)
            warnings += [f"{node.name}: {w}" for w in found]
    else:
        warnings = await _check_config(redis.execute_command)
        if min_replicas:
            warnings += await _check_replicas(redis.execute_command, min_replicas)
    for w in warnings:
        log.warning(w)
    return warnings


def _config(reply: Any) -> dict[str, str]:
    """CONFIG GET's reply (a flat list, or a dict once redis-py has parsed it) as a dict."""
    if isinstance(reply, dict):
        return {_text(k): _text(v) for k, v in reply.items()}
    return {_text(k): _text(v) for k, v in zip(reply[::2], reply[1::2], strict=True)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _check_replicas(ask: Ask, min_replicas: int) -> list[str]:
    try:
        info = await ask("INFO", "replication")
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


async def _check_config(ask: Ask) -> list[str]:
    warnings: list[str] = []
    try:
        aof = _config(await ask("CONFIG GET", "appendonly"))
        policy = _config(await ask("CONFIG GET", "maxmemory-policy"))
        fsync = _config(await ask("CONFIG GET", "appendfsync"))
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
