"""Prometheus exposition. Queue numbers are global (read from Redis at scrape time), so
every API process reports the same values and any of them can be scraped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from service.core.histograms import HISTOGRAMS


def _histogram(name: str, doc: str, raw: dict[str, float]) -> HistogramMetricFamily:
    buckets = [(str(le), raw.get(f"{name}:le:{le}", 0.0)) for le in HISTOGRAMS[name]]
    count = raw.get(f"{name}:count", 0.0)
    buckets.append(("+Inf", count))
    return HistogramMetricFamily(
        f"wbcache_{name}", doc, buckets=buckets, sum_value=raw.get(f"{name}:sum", 0.0)
    )


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
            (
                "wbcache_edge_purges_pending",
                "Edge purges queued, being sent or retried",
                "edge_purges_pending",
            ),
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
            (
                "wbcache_flush_retries",
                "Flush attempts made again after a failure (with backoff)",
                "flush_retries",
            ),
            ("wbcache_dead_lettered", "Writes moved to the dead letters", "dead_lettered_total"),
            ("wbcache_cache_hits", "Reads answered from Redis", "hits"),
            ("wbcache_cache_misses", "Reads that loaded from Postgres", "misses"),
            (
                "wbcache_edge_purges",
                "First purges every edge confirmed (second purges not counted)",
                "edge_purges",
            ),
            (
                "wbcache_edge_purge_failures",
                "Purge rounds an edge did not confirm (retried with backoff)",
                "edge_purge_failures",
            ),
        ]
        for name, doc, field in counters:
            yield CounterMetricFamily(name, doc, value=s[field])
        raw = s.get("raw_counters", {})
        yield _histogram("flush_batch_size", "Keys per committed flush batch", raw)
        yield _histogram("flush_duration_seconds", "Time to persist one batch", raw)
        yield _histogram(
            "edge_purge_latency_seconds",
            "From a write (or invalidation) to every edge's confirmation of its purge",
            raw,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        # Per process: each API process times its own requests.
        self.http_latency = Histogram(
            "wbcache_http_request_duration_seconds",
            "HTTP request latency by route template",
            ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        # labels() validates and looks up its child under a lock on every call: keep them.
        self._http_children: dict[tuple[str, str, int], Any] = {}
        # The memcached door's commands (service/api/memcached/), on the same scrape.
        self.memcached_latency = Histogram(
            "wbcache_memcached_command_duration_seconds",
            "Memcached protocol command latency by command and outcome (ok, error, "
            "client_error, server_error; errors hidden by noreply are counted too)",
            ["command", "outcome"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self._memcached_children: dict[tuple[str, str], Any] = {}

    def observe_http(self, method: str, route: str, status: int, seconds: float) -> None:
        child = self._http_children.get((method, route, status))
        if child is None:
            child = self.http_latency.labels(method, route, str(status))
            self._http_children[(method, route, status)] = child
        child.observe(seconds)

    def observe_memcached(self, command: str, outcome: str, seconds: float) -> None:
        child = self._memcached_children.get((command, outcome))
        if child is None:
            child = self.memcached_latency.labels(command, outcome)
            self._memcached_children[(command, outcome)] = child
        child.observe(seconds)

    def render(self, stats: dict[str, Any]) -> bytes:
        self._snapshot.stats = stats
        return generate_latest(self.registry)
