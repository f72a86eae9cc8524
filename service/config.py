"""Settings, read once from the environment (flags of the CLI override them)."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.adapters.redis_url import (
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
)

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
# Shards when REDIS_SHARDS is not set: one on a standalone Redis or Sentinel (keys exactly
# as before sharding existed); on a Cluster, enough to spread over a few primaries and
# grow (docs/scaling.md, "Choosing REDIS_SHARDS").
DEFAULT_CLUSTER_SHARDS = 16

WriteMode = Literal["behind", "through"]


class CachePolicy(BaseModel):
    """One collection's HTTP cache policy (COLLECTION_CACHE). ``public`` lets shared caches
    (a CDN, Varnish) store its records; ``s_maxage`` is their lifetime there, ``max_age``
    the browsers'. ``not_found_s_maxage``: how long a shared cache may keep a 404 of a
    public collection (0, the default: ``no-store``, so no create is ever hidden by one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    public: bool = False
    max_age: int = Field(default=0, ge=0)
    s_maxage: int | None = Field(default=None, ge=0)
    stale_while_revalidate: int | None = Field(default=None, ge=0)
    stale_if_error: int | None = Field(default=None, ge=0)
    not_found_s_maxage: int = Field(default=0, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://127.0.0.1:5432/wbcache"
    redis_prefix: str = "wb:"

    # Write path
    max_document_bytes: int = 1024 * 1024
    max_pending: int = 1_000_000
    # Past MAX_PENDING: "reject" answers 503 + Retry-After; "through" writes synchronously.
    backpressure_mode: Literal["reject", "through"] = "reject"
    write_through_timeout: float = 5.0
    # Per-collection overrides, as JSON in the environment: {"orders": "through"}
    collection_write_mode: dict[str, WriteMode] = Field(default_factory=dict)

    # Acknowledged means replicated: a write is answered 2xx only once this many Redis
    # replicas hold it (WAIT, in the write's own round trip); if fewer confirm within
    # REDIS_REPLICA_TIMEOUT_MS, 503 replicas_unconfirmed (the primary has the write). 0: the
    # primary's word suffices, and the write path sends nothing more.
    redis_min_replicas: int = Field(default=0, ge=0)
    # At most 4,000: WAIT must answer within the Redis client's 5 s read timeout.
    redis_replica_timeout_ms: int = Field(default=1000, ge=1, le=4000)

    # Redis Cluster (REDIS_URL=redis+cluster://...). The write-behind queue is split into
    # this many shards, each in one hash slot; fixed at deploy time (changing it strands
    # the pending writes of the old layout). Empty: 1, or DEFAULT_CLUSTER_SHARDS on a
    # Cluster. Above 1 on a standalone Redis it works the same (one Redis, several queues).
    redis_shards: int | None = Field(default=None, ge=1, le=1024)
    # A standalone Redis for arq's flush wake-up jobs when REDIS_URL is a Cluster (arq has
    # no Cluster support). Empty: workers poll the shards instead (the delay stays bounded).
    arq_redis_url: str | None = None

    # Read path
    clean_ttl_seconds: int = 3600
    negative_ttl_seconds: int = 60
    tombstone_ttl_seconds: int = 600
    cache_control_default: str = "private, no-cache"
    # Per-collection HTTP cache policy, as JSON in the environment (docs/edge.md):
    # {"products": {"public": true, "max_age": 60, "s_maxage": 300,
    #               "stale_while_revalidate": 30, "stale_if_error": 600}}
    collection_cache: dict[str, CachePolicy] = Field(default_factory=dict)
    # The older form, still read: {"products": 60} means {"products": {"max_age": 60}}
    # (private). A collection may not be named in both.
    collection_max_age: dict[str, int] = Field(default_factory=dict)

    # The edge (docs/edge.md): base URLs of the Varnish (xkey) edges to purge after writes
    # to public collections and invalidations, comma-separated; empty = none.
    edge_purge_urls: str = ""
    # A second purge of the same keys this long after the first: an edge fetch already in
    # flight when the first purge landed may have stored the old version again.
    edge_purge_echo_ms: int = Field(default=1000, ge=0)
    # Longest wait for one edge's answer to a purge; and the retry backoff's cap.
    edge_purge_timeout_seconds: float = Field(default=2.0, gt=0)
    edge_purge_backoff_max_seconds: float = Field(default=10.0, gt=0)
    # A CloudFront distribution the workers invalidate the same way (docs/edge.md; needs
    # the `cloudfront` extra, boto3). AWS credentials come from boto3's usual chain.
    cloudfront_distribution_id: str = ""
    # Another endpoint for the CloudFront API (a local stand-in in tests); empty: AWS's.
    cloudfront_endpoint_url: str = ""
    # At most one CreateInvalidation per this many seconds per worker: the queue
    # coalesces what waits meanwhile (CloudFront bills paths and throttles calls).
    cloudfront_min_interval_seconds: float = Field(default=5.0, ge=0)

    # Flush path (worker)
    write_delay_ms: int = 1000
    # At most 3,000: the scripts pass a batch's keys to one command with unpack(), and
    # Redis' Lua takes at most 8,000 values that way (claim sends two per key).
    batch_size: int = Field(default=1000, ge=1, le=3000)
    flush_concurrency: int = 2
    lease_seconds: float = 10.0
    sweep_seconds: int = 5
    retry_backoff_max_seconds: float = 5.0
    tombstone_retention_days: int = 7
    # Distinct keys the key filter is sized for (service/core/key_filter.py): writes to
    # keys never written need no Postgres read. About 1.2 bytes of Redis per key; 0: off.
    key_filter_capacity: int = Field(default=4_000_000, ge=0, le=10_000_000_000)

    # Connections
    pg_pool_max: int = 8
    redis_max_connections: int = 128
    # The records hot path's commands share one connection per API process, written
    # together (auto-pipelining: service/adapters/redis_mux.py). Off: a pooled connection
    # per command. Not used on a Cluster.
    redis_multiplex: bool = True
    pg_timeout_seconds: float = 5.0
    # 0 behind pgbouncer in transaction pooling mode (no prepared statements across
    # transactions); asyncpg's default otherwise.
    pg_statement_cache_size: int = 100

    # HTTP limits of `wbcache serve` (per process; service/adapters/http_server.py).
    # Request line + headers, bytes: past it 431 and close.
    http_max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # From a connection's open (or a later request's first byte) to the end of its
    # headers: past it 408 and close. A connection that sends nothing is closed then too.
    http_header_timeout_seconds: float = Field(default=10.0, gt=0)
    # Longest pause between two reads of a request body; and past that grace, the body
    # must average at least HTTP_BODY_MIN_RATE bytes/s (Apache's MinRate): else 408.
    http_body_timeout_seconds: float = Field(default=30.0, gt=0)
    http_body_min_rate: int = Field(default=500, ge=1)
    # Open connections: past it a new one closes the oldest idle one, else gets 503.
    http_max_connections: int = Field(default=2048, ge=1)
    # An idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive).
    http_keep_alive_timeout_seconds: int = Field(default=5, ge=1)

    # The memcached door (service/api/memcached/, docs/memcached.md): off unless a port is
    # set. The protocol has no authentication: bind it where only trusted clients reach.
    memcached_port: int | None = Field(default=None, ge=0, le=65535)
    memcached_bind: str = "127.0.0.1"
    # Where a key without "collection:" lives.
    memcached_collection: str = "kv"
    # flush_all deletes the memcached collection's records (through the write path) only
    # when this is true; otherwise it answers SERVER_ERROR.
    memcached_allow_flush: bool = False
    memcached_max_connections: int = Field(default=4096, ge=1)

    # The worker touches this file on every heartbeat (`wbcache healthcheck worker`).
    worker_heartbeat_file: str = "/tmp/wbcache-worker.heartbeat"

    # "key:scope,key:scope" (scope read, write or admin); empty = open.
    api_keys: str = ""
    # /metrics without a key even when API_KEYS is set (Prometheus scrapes it).
    metrics_public: bool = True

    log_level: str = "INFO"
    log_json: bool = False

    @field_validator("redis_url")
    @classmethod
    def _known_redis_url(cls, url: str) -> str:
        """A malformed REDIS_URL is refused at start with what to fix, not at the first
        connection with a traceback."""
        scheme = url.partition("://")[0].lower()
        if scheme not in REDIS_SCHEMES:
            raise ValueError(
                f"REDIS_URL must start with one of {', '.join(s + '://' for s in REDIS_SCHEMES)}"
            )
        if is_sentinel_url(url):
            parse_sentinel_url(url)
        if is_cluster_url(url):
            parse_cluster_url(url)
        return url

    @field_validator("arq_redis_url")
    @classmethod
    def _standalone_arq_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        scheme = url.partition("://")[0].lower()
        if scheme not in ("redis", "rediss", "unix", "redis+sentinel"):
            raise ValueError(
                "ARQ_REDIS_URL must be a standalone or Sentinel Redis "
                "(redis://, rediss://, unix://, redis+sentinel://)"
            )
        if is_sentinel_url(url):
            parse_sentinel_url(url)
        return url

    @field_validator("edge_purge_urls")
    @classmethod
    def _http_edges(cls, urls: str) -> str:
        for url in _split_urls(urls):
            if not url.startswith("http://"):
                raise ValueError(
                    f"EDGE_PURGE_URLS: {url!r} must be an http:// base URL of a Varnish edge "
                    "(the purge goes over plain HTTP, from the networks its VCL allows)"
                )
        return urls

    @model_validator(mode="after")
    def _one_cache_policy_per_collection(self) -> Settings:
        both = sorted(set(self.collection_cache) & set(self.collection_max_age))
        if both:
            raise ValueError(
                f"{', '.join(both)} named in both COLLECTION_MAX_AGE and COLLECTION_CACHE: "
                'move it to COLLECTION_CACHE alone, e.g. {"%s": {"max_age": %d}}'
                % (both[0], self.collection_max_age[both[0]])
            )
        return self

    @property
    def cache_policies(self) -> dict[str, CachePolicy]:
        """COLLECTION_CACHE with COLLECTION_MAX_AGE's entries as private policies."""
        older = {c: CachePolicy(max_age=s) for c, s in self.collection_max_age.items()}
        return {**older, **self.collection_cache}

    @property
    def edge_urls(self) -> list[str]:
        return _split_urls(self.edge_purge_urls)

    @property
    def purges_edges(self) -> bool:
        """Edges to purge: Varnish URLs or a CloudFront distribution."""
        return bool(self.edge_urls or self.cloudfront_distribution_id)

    @property
    def purged_collections(self) -> frozenset[str]:
        """Collections whose writes queue edge purges: the public ones, when there are
        edges to purge."""
        if not self.purges_edges:
            return frozenset()
        return frozenset(c for c, p in self.collection_cache.items() if p.public)

    @model_validator(mode="after")
    def _prefix_fits_hash_tags(self) -> Settings:
        if self.sharded and ("{" in self.redis_prefix or "}" in self.redis_prefix):
            raise ValueError(
                "REDIS_PREFIX must not contain '{' or '}' with shards: each shard's keys "
                "carry their own hash tag"
            )
        return self

    @property
    def cluster(self) -> bool:
        """REDIS_URL names a Redis Cluster."""
        return is_cluster_url(self.redis_url)

    @property
    def shards(self) -> int:
        if self.redis_shards is not None:
            return self.redis_shards
        return DEFAULT_CLUSTER_SHARDS if self.cluster else 1

    @property
    def sharded(self) -> bool:
        """Keys carry a shard hash tag: always on a Cluster, and with more than one shard."""
        return self.cluster or self.shards > 1


def _split_urls(urls: str) -> list[str]:
    return [u.strip().rstrip("/") for u in urls.split(",") if u.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
