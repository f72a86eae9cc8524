"""Flush histograms kept in Redis (the counters hash), so that every API process exports
the same, global distribution; the workers add to them once per batch."""

from __future__ import annotations

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline

BATCH_SIZE_BUCKETS = (1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
HISTOGRAMS = {
    "flush_batch_size": BATCH_SIZE_BUCKETS,
    "flush_duration_seconds": DURATION_BUCKETS,
    # From the write (or invalidation) to the edges' acknowledgement of its purge.
    "edge_purge_latency_seconds": DURATION_BUCKETS,
}


def observe(pipe: Pipeline | ClusterPipeline, counters_key: str, name: str, value: float) -> None:
    """Add one observation to a Redis-kept histogram (cumulative buckets)."""
    for le in HISTOGRAMS[name]:
        if value <= le:
            pipe.hincrby(counters_key, f"{name}:le:{le}", 1)
    pipe.hincrby(counters_key, f"{name}:count", 1)
    pipe.hincrbyfloat(counters_key, f"{name}:sum", value)
