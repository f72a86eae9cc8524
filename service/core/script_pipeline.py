"""Script calls sent as one pipeline: EVALSHA per command, error replies in place, and
with REDIS_MIN_REPLICAS the WAIT that counts the replicas holding them."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from service.adapters.redis import AnyRedis
from service.core.write_commands import Command

log = logging.getLogger("wbcache.records")


async def pipelined_scripts(
    redis: AnyRedis,
    script: AsyncScript,
    commands: Sequence[Command],
    replicas: int = 0,
    replica_timeout_ms: int = 0,
) -> tuple[list[Any], list[Any]]:
    """EVALSHA of ``script`` for each (keys, args), one pipeline, no SCRIPT EXISTS
    first (redis-py sends one for Script objects in pipelines). Error replies (NOSCRIPT
    after a Redis restart, OOM, ...) come back in place, per command. Returns the
    replies and, with REDIS_MIN_REPLICAS, each command's WAIT reply (else Nones): on
    one Redis a single WAIT after the scripts, in the same round trip."""
    if isinstance(redis, RedisCluster):
        return await _pipelined_scripts_cluster(
            redis, script, commands, replicas, replica_timeout_ms
        )
    async with redis.pipeline(transaction=False) as pipe:
        for keys, args in commands:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        if replicas:
            pipe.wait(replicas, replica_timeout_ms)
        raws: list[Any] = await pipe.execute(raise_on_error=False)
    ack = raws.pop() if replicas else None
    return raws, [ack] * len(raws)


async def _pipelined_scripts_cluster(
    cluster: RedisCluster,
    script: AsyncScript,
    commands: Sequence[Command],
    replicas: int,
    replica_timeout_ms: int,
) -> tuple[list[Any], list[Any]]:
    """``pipelined_scripts`` on a Cluster: redis-py splits the pipeline by node (one
    round trip per node, in parallel) and follows MOVED/ASK per command. WAIT counts
    the replicas of one connection's writes, so it is sent afterwards to the primary
    that now owns each script's slot (a second round trip, per node in parallel):
    after a redirection, that is the node that ran the script."""
    async with cluster.pipeline() as pipe:
        for keys, args in commands:
            # redis-py refuses pipe.evalsha() in Cluster mode, though its pipeline
            # routes EVALSHA by the keys like any keyed command.
            pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        raws: list[Any] = await pipe.execute(raise_on_error=False)
    if not replicas:
        return raws, [None] * len(raws)
    nodes = [cluster.get_node_from_key(keys[0]) for keys, _ in commands]
    by_name = {node.name: node for node in nodes if node is not None}
    names = list(by_name)
    replies = await asyncio.gather(
        *(
            cluster.execute_command(
                "WAIT",
                replicas,
                replica_timeout_ms,
                target_nodes=by_name[name],
            )
            for name in names
        ),
        return_exceptions=True,
    )
    acks = dict(zip(names, replies, strict=True))
    return raws, [acks.get(node.name) if node else None for node in nodes]


def replicas_confirmed(ack: Any) -> int:
    """WAIT's reply: how many replicas hold the connection's writes (its error reply, which
    a pipeline returns in place, counts as none)."""
    if isinstance(ack, int):
        return ack
    log.warning("WAIT for Redis replicas failed: %s", ack)
    return 0
