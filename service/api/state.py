"""Per-process resources of the API, created by the lifespan and read by the routes."""

from __future__ import annotations

from dataclasses import dataclass, field

from arq.connections import ArqRedis

from service.adapters.postgres import PgPool
from service.adapters.redis import AnyRedis, close_redis
from service.adapters.redis_mux import RedisMux
from service.api.cache_headers import CacheHeaders
from service.api.metrics import Metrics
from service.config import Settings
from service.core.deadletters import DeadLetters
from service.core.records import RecordStore
from service.core.shards import Shards
from service.core.write_through import WriteThrough


@dataclass
class HitCounters:
    """Hits and misses of this process, added to the shared counters in Redis by a
    periodic task (so a cache hit costs no extra round trip)."""

    hits: int = 0
    misses: int = 0

    def record(self, hit: bool) -> None:
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def take(self) -> tuple[int, int]:
        out = (self.hits, self.misses)
        self.hits = self.misses = 0
        return out


@dataclass
class AppState:
    settings: Settings
    shards: Shards
    redis: AnyRedis
    # Where flush wake-ups are enqueued (REDIS_URL's Redis, a Cluster's ARQ_REDIS_URL, or
    # none on a Cluster without it).
    arq: ArqRedis | None
    pg: PgPool
    store: RecordStore
    write_through: WriteThrough
    counters: HitCounters
    metrics: Metrics
    dead_letters: DeadLetters
    cache_headers: CacheHeaders
    # The records hot path's shared connection (None: the pool for everything).
    mux: RedisMux | None = None
    postgres_status: str = "unknown"
    redis_config_warnings: list[str] = field(default_factory=list)

    async def aclose(self) -> None:
        """Close the connections: Postgres, the shared Redis connection, the clients."""
        await self.pg.close()
        if self.mux is not None:
            await self.mux.aclose()
        await close_redis(self.redis)
        if self.arq is not None and self.arq is not self.redis:
            await close_redis(self.arq)

    async def flush_counters(self) -> None:
        hits, misses = self.counters.take()
        if not hits and not misses:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self.shards.any.counters, "hits", hits)
                pipe.hincrby(self.shards.any.counters, "misses", misses)
                await pipe.execute()
        except Exception:
            # Keep them for the next attempt rather than lose them.
            self.counters.hits += hits
            self.counters.misses += misses
            raise
