"""Prometheus exposition. Queue numbers are global (read from Redis at scrape time), so
every API process reports the same values and any of them can be scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class _Snapshot(Collector):
    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if not s:
            return
        gauges = [
            ("wbcache_pending", "Keys whose newest write is not yet persisted", "pending"),
            ("wbcache_queued_jobs", "Flush wake-up jobs queued in arq", "queued_jobs"),
            ("wbcache_batches_in_flight", "Flush batches held by workers", "batches_in_flight"),
            (
                "wbcache_dead_letters",
                "Writes Postgres refused, awaiting an operator",
                "dead_letters",
            ),
            ("wbcache_workers_live", "Workers with a recent heartbeat", "workers"),
        ]
        for name, doc, field in gauges:
            yield GaugeMetricFamily(name, doc, value=s[field])
        age = s["oldest_pending_age_s"]
        yield GaugeMetricFamily(
            "wbcache_oldest_pending_age_seconds",
            "Age of the oldest write not yet persisted (0 when none)",
            value=age or 0.0,
        )
        counters = [
            ("wbcache_flushed_writes", "Writes committed to Postgres by flushes", "flushed"),
            ("wbcache_flush_batches", "Flush batches committed", "flush_batches"),
            (
                "wbcache_flush_failures",
                "Flush attempts that failed and were retried",
                "flush_failures",
            ),
            ("wbcache_dead_lettered", "Writes moved to the dead letters", "dead_lettered_total"),
            ("wbcache_cache_hits", "Reads answered from Redis", "hits"),
            ("wbcache_cache_misses", "Reads that loaded from Postgres", "misses"),
        ]
        for name, doc, field in counters:
            yield CounterMetricFamily(name, doc, value=s[field])


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)

    def render(self, stats: dict[str, Any]) -> bytes:
        self._snapshot.stats = stats
        return generate_latest(self.registry)
