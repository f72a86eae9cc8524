"""The durable edge purge queue: one sorted set per shard (``Keys.purge_queue``), member
-> when due (ms, Redis' clock).

Writes to a public collection's records queue ``r:<collection>:<key>`` inside write.lua
(so an acknowledged write always has its purge queued); a batch and POST /v1/invalidate
queue theirs with ``add``. Purgers (worker/purge.py) ``claim`` what is due under a lease,
tell every edge, then ``settle``: done (removed, and a second purge queued a little later,
for an edge fetch that was in flight when the first landed) or retry (due again after a
backoff). Ten writes to one key before its purge is claimed make one purge."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from service.adapters.redis import AnyRedis
from service.core import histograms
from service.core.redis_keys import Keys, member
from service.core.scripts import Scripts
from service.core.shards import Shards
from service.core.surrogate import COLLECTION, RECORD

# The second purge's member: the first's with this before it.
ECHO = "~"


def record_member(collection: str, key: str) -> str:
    return RECORD + member(collection, key)


def collection_member(collection: str) -> str:
    return COLLECTION + collection


@dataclass(frozen=True, slots=True)
class Claim:
    """Due purges of one shard, hidden from other purgers until ``lease_ms``."""

    keys: Keys
    now_ms: int
    lease_ms: int
    # (member, when it became due, ms)
    items: list[tuple[str, int]]

    @property
    def members(self) -> list[str]:
        return [m for m, _ in self.items]


class PurgeQueue:
    def __init__(self, redis: AnyRedis, shards: Shards, scripts: Scripts) -> None:
        self.redis = redis
        self.shards = shards
        self.scripts = scripts

    async def add(self, members: Iterable[str]) -> None:
        """Queue purges, due now: one script per shard, the shards at once."""
        by_shard: dict[int, list[str]] = {}
        for m in members:
            by_shard.setdefault(self._shard(m), []).append(m)
        await asyncio.gather(
            *(
                self.scripts.purge_add(keys=[self.shards[shard].purge_queue], args=group)
                for shard, group in by_shard.items()
            )
        )

    def _shard(self, queued: str) -> int:
        """A record's purge lives on the record's shard; a collection's on the first."""
        if queued.startswith(RECORD):
            return self.shards.index(queued[len(RECORD) :])
        return 0

    async def claim(self, lease_ms: int, limit: int) -> list[Claim]:
        """The due purges of every shard (at most ``limit`` per shard), leased."""
        claims = []
        for k in self.shards:
            now, lease, flat = await self.scripts.purge_claim(
                keys=[k.purge_queue], args=[lease_ms, limit]
            )
            if flat:
                items = [
                    (m.decode(), int(float(s))) for m, s in zip(flat[::2], flat[1::2], strict=True)
                ]
                claims.append(Claim(k, int(now), int(lease), items))
        return claims

    async def done(
        self,
        claim: Claim,
        echo_ms: int,
        elapsed_s: float,
        since: Mapping[str, int] | None = None,
    ) -> None:
        """The edges dropped ``claim``'s keys: remove them (and queue their second purge),
        count them, and time each first purge from when it was queued (``since``: when,
        for purges that were retried, which are due again later than that)."""
        await self.scripts.purge_settle(
            keys=[claim.keys.purge_queue], args=[claim.lease_ms, "done", echo_ms, *claim.members]
        )
        # Counted and timed once per write (or invalidation): the second purges are not.
        firsts = [(m, due) for m, due in claim.items if not m.startswith(ECHO)]
        if not firsts:
            return
        counters = self.shards.any.counters
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(counters, "edge_purges", len(firsts))
            for m, due in firsts:
                queued = since.get(m, due) if since else due
                latency = max(0.0, (claim.now_ms - queued) / 1000 + elapsed_s)
                histograms.observe(pipe, counters, "edge_purge_latency_seconds", latency)
            await pipe.execute()

    async def retry(self, claim: Claim, backoff_ms: int) -> None:
        """An edge did not confirm: every key of ``claim`` is purged again (on every edge)
        after ``backoff_ms``."""
        await self.scripts.purge_settle(
            keys=[claim.keys.purge_queue],
            args=[claim.lease_ms, "retry", backoff_ms, *claim.members],
        )
        await self.redis.hincrby(self.shards.any.counters, "edge_purge_failures", 1)  # type: ignore[misc]
