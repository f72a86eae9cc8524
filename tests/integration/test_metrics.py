"""/metrics (Prometheus text) moves with the service: the queue gauges with writes and
flushes, the flush counters and histograms with batches, the cache counters with reads,
the HTTP latency histogram by route template; every response carries a request id."""

from __future__ import annotations

import re
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.conftest import running_worker, wait_drained, wait_until

RECORD_ROUTE = "/v1/{collection}/{key:anything}"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(api: httpx.AsyncClient) -> Samples:
    r = await api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name} {labels}"
    return samples[key]


async def stats(api: httpx.AsyncClient) -> dict[str, Any]:
    s: dict[str, Any] = (await api.get("/v1/stats")).json()
    return s


async def test_queue_gauges_and_flush_counters_move(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    before = await scrape(api)
    assert value(before, "wbcache_pending") == 0
    assert value(before, "wbcache_oldest_pending_age_seconds") == 0
    flushed0 = value(before, "wbcache_flushed_writes_total")
    batches0 = value(before, "wbcache_flush_batch_size_count")
    size_sum0 = value(before, "wbcache_flush_batch_size_sum")
    durations0 = value(before, "wbcache_flush_duration_seconds_count")

    for i in range(12):
        assert (await api.put(f"/v1/m/k{i}", json={"i": i})).status_code == 201
    for i in range(4):  # rewrites coalesce: still 12 pending keys
        assert (await api.put(f"/v1/m/k{i}", json={"i": i, "v": 2})).status_code == 200

    during = await scrape(api)
    assert value(during, "wbcache_pending") == 12
    assert value(during, "wbcache_pending") == (await stats(api))["pending"]
    assert value(during, "wbcache_oldest_pending_age_seconds") > 0
    assert value(during, "wbcache_flushed_writes_total") == flushed0

    async with running_worker(settings):
        await wait_drained(api)
    after = await scrape(api)
    assert value(after, "wbcache_pending") == 0 == (await stats(api))["pending"]
    assert value(after, "wbcache_oldest_pending_age_seconds") == 0
    assert value(after, "wbcache_flushed_writes_total") - flushed0 == 12
    assert value(after, "wbcache_flush_batches_total") >= 1
    batches = value(after, "wbcache_flush_batch_size_count") - batches0
    assert batches >= 1
    assert value(after, "wbcache_flush_batch_size_sum") - size_sum0 == 12
    assert value(after, "wbcache_flush_duration_seconds_count") - durations0 == batches
    # Cumulative buckets: +Inf holds every batch.
    assert value(after, "wbcache_flush_batch_size_bucket", le="+Inf") - batches0 == batches
    assert value(after, "wbcache_dead_letters") == 0
    assert value(after, "wbcache_flush_failures_total") == 0


async def test_hit_and_miss_counters(
    api: httpx.AsyncClient, settings: Settings, redis: Any
) -> None:
    before = await scrape(api)
    hits0 = value(before, "wbcache_cache_hits_total")
    misses0 = value(before, "wbcache_cache_misses_total")

    assert (await api.put("/v1/m/cached", json={"a": 1})).status_code == 201
    for _ in range(3):
        r = await api.get("/v1/m/cached")
        assert r.status_code == 200 and r.headers["x-cache"] == "hit"
    assert (await api.head("/v1/m/cached")).headers["x-cache"] == "hit"
    for key in ("absent1", "absent2"):
        r = await api.get(f"/v1/m/{key}")
        assert r.status_code == 404 and r.headers["x-cache"] == "miss"

    after = await scrape(api)
    assert value(after, "wbcache_cache_hits_total") - hits0 == 4
    assert value(after, "wbcache_cache_misses_total") - misses0 == 2
    s = await stats(api)
    assert (s["hits"], s["misses"]) == (hits0 + 4, misses0 + 2)

    # Without any scrape, the API adds its counts to Redis within about a second.
    for _ in range(5):
        assert (await api.get("/v1/m/cached")).headers["x-cache"] == "hit"
    counters = f"{settings.redis_prefix}counters"

    async def shared_hits() -> bool:
        return int(await redis.hget(counters, "hits") or 0) == hits0 + 9

    await wait_until(shared_hits, timeout=10)


async def test_http_latency_by_route_template(api: httpx.AsyncClient) -> None:
    for i in range(3):
        assert (await api.put(f"/v1/m/a%2Fb{i}", json={"i": i})).status_code == 201
    assert (await api.get("/v1/m/a%2Fb0")).status_code == 200
    samples = await scrape(api)
    put_count = value(
        samples,
        "wbcache_http_request_duration_seconds_count",
        method="PUT",
        route=RECORD_ROUTE,
        status="201",
    )
    assert put_count == 3
    get_count = value(
        samples,
        "wbcache_http_request_duration_seconds_count",
        method="GET",
        route=RECORD_ROUTE,
        status="200",
    )
    assert get_count == 1
    assert (
        value(
            samples,
            "wbcache_http_request_duration_seconds_bucket",
            method="PUT",
            route=RECORD_ROUTE,
            status="201",
            le="+Inf",
        )
        == 3
    )
    # Keys never become label values (that would explode the series count).
    routes = {dict(labels).get("route") for (_, labels) in samples}
    assert not any(r and "a/b" in r for r in routes), routes


async def test_request_id_on_every_response(api: httpx.AsyncClient) -> None:
    r = await api.get("/healthz")
    rid = r.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{8,}", rid), rid
    other = (await api.get("/healthz")).headers["x-request-id"]
    assert other != rid

    sent = "client-chose-this-id-42"
    r = await api.put("/v1/m/rid", json={"a": 1}, headers={"X-Request-ID": sent})
    assert r.status_code == 201 and r.headers["x-request-id"] == sent
    # Errors carry it too.
    r = await api.get("/v1/m/nope", headers={"X-Request-ID": sent})
    assert r.status_code == 404 and r.headers["x-request-id"] == sent
    r = await api.get("/no/such/route")
    assert r.status_code == 404 and r.headers["x-request-id"]
