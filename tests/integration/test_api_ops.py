"""The operations API: invalidation, /v1/stats, /healthz, /readyz and /metrics, against the
real Redis and Postgres."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from arq.worker import Worker
from prometheus_client.parser import text_string_to_metric_families

from service.adapters.redis import create_redis
from service.config import Settings
from service.dev.embedded import RedisServer
from tests.conftest import running_api, running_worker, wait_drained, wait_until

if TYPE_CHECKING:  # a class named Test* must not be collected as a test class
    from tests.support.servers import TestServers


@pytest.fixture
async def pg(servers: TestServers) -> AsyncIterator[asyncpg.Connection]:
    """conftest's ``pg`` without its TRUNCATE (slow under load): every test here writes only
    to collections of its own, so nothing another test left in Postgres can meet it."""
    conn = await asyncpg.connect(servers.database_url)
    yield conn
    await conn.close()


@pytest.fixture
def c() -> str:
    """A collection of this test alone: Postgres is shared by every test of the session."""
    return f"t{uuid.uuid4().hex[:12]}"


def entry_key(settings: Settings, collection: str, key: str) -> str:
    return f"{settings.redis_prefix}e:{collection}:{key}"


async def stats(api: httpx.AsyncClient) -> dict[str, Any]:
    r = await api.get("/v1/stats")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


async def invalidate(api: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await api.post("/v1/invalidate", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert set(out) >= {"invalidated", "skipped_pending"}
    return out


async def metrics(api: httpx.AsyncClient) -> dict[str, float]:
    r = await api.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if not sample.labels:
                samples[sample.name] = sample.value
    return samples


# -- invalidate -------------------------------------------------------------------------------


async def test_invalidate_keys_drops_clean_copies_only(
    api: httpx.AsyncClient, settings: Settings, pg: asyncpg.Connection, c: str
) -> None:
    # No worker yet: "k1" and "k2" stay pending until one runs.
    await api.put(f"/v1/{c}/k1", json={"v": 1})
    await api.put(f"/v1/{c}/k2", json={"v": 1})
    async with running_worker(settings):
        await wait_drained(api)
    await api.put(f"/v1/{c}/k2", json={"v": 2})  # pending again, no worker runs

    out = await invalidate(api, {"collection": c, "keys": ["k1", "k2", "never-seen"]})
    assert out["invalidated"] == 1
    assert out["skipped_pending"] == 1
    assert (await stats(api))["pending"] == 1

    r1 = await api.get(f"/v1/{c}/k1")
    assert r1.headers["x-cache"] == "miss"
    assert r1.json() == {"v": 1}
    r2 = await api.get(f"/v1/{c}/k2")
    assert r2.headers["x-cache"] == "hit"
    assert r2.json() == {"v": 2}

    # The pending write survived the invalidation and is persisted once a worker runs.
    async with running_worker(settings):
        await wait_drained(api)
    row = await pg.fetchrow(
        "SELECT value::text AS value FROM records WHERE collection = $1 AND key = 'k2'", c
    )
    assert row is not None and json.loads(row["value"]) == {"v": 2}


async def test_invalidate_loads_a_row_another_program_changed(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection, c: str
) -> None:
    put = await api.put(f"/v1/{c}/k", json={"by": "wbcache"})
    await wait_drained(api)
    status = await pg.execute(
        'UPDATE records SET value = \'{"by": "another program"}\' '
        "WHERE collection = $1 AND key = 'k'",
        c,
    )
    assert status == "UPDATE 1"
    # Until invalidated, the cache answers its copy.
    assert (await api.get(f"/v1/{c}/k")).json() == {"by": "wbcache"}
    out = await invalidate(api, {"collection": c, "keys": ["k"]})
    assert out == {**out, "invalidated": 1, "skipped_pending": 0}
    r = await api.get(f"/v1/{c}/k")
    assert r.status_code == 200
    assert r.headers["x-cache"] == "miss"
    assert r.json() == {"by": "another program"}
    assert r.headers["etag"] == put.headers["etag"]  # the row's version is unchanged
    assert (await api.get(f"/v1/{c}/k")).headers["x-cache"] == "hit"

    # Another program also bumps the version: the ETag follows the row.
    await pg.execute(
        'UPDATE records SET value = \'{"by": "v2"}\', version = version + 1 '
        "WHERE collection = $1 AND key = 'k'",
        c,
    )
    await invalidate(api, {"collection": c, "keys": ["k"]})
    r = await api.get(f"/v1/{c}/k")
    assert r.json() == {"by": "v2"}
    assert r.headers["etag"] == f'"{int(put.json()["version"]) + 1}"'

    # A row another program deleted: the next read is a 404.
    await pg.execute("DELETE FROM records WHERE collection = $1 AND key = 'k'", c)
    await invalidate(api, {"collection": c, "keys": ["k"]})
    assert (await api.get(f"/v1/{c}/k")).status_code == 404


async def test_invalidate_whole_collection(
    api: httpx.AsyncClient, settings: Settings, redis: Any, c: str
) -> None:
    other = f"{c}-other"
    for key in ("a", "b", "p"):
        await api.put(f"/v1/{c}/{key}", json={"k": key})
    await api.put(f"/v1/{other}/a", json={"k": "other"})
    async with running_worker(settings):
        await wait_drained(api)
    await api.put(f"/v1/{c}/p", json={"k": "pending"})  # no worker runs now

    out = await invalidate(api, {"collection": c})
    assert out["invalidated"] == 2
    assert out["skipped_pending"] == 1
    assert await redis.exists(entry_key(settings, c, "a")) == 0
    assert await redis.exists(entry_key(settings, c, "b")) == 0
    assert (await api.get(f"/v1/{c}/a")).headers["x-cache"] == "miss"
    assert (await api.get(f"/v1/{c}/b")).json() == {"k": "b"}
    p = await api.get(f"/v1/{c}/p")
    assert p.headers["x-cache"] == "hit" and p.json() == {"k": "pending"}
    # Another collection is untouched.
    assert (await api.get(f"/v1/{other}/a")).headers["x-cache"] == "hit"
    assert (await stats(api))["pending"] == 1

    # Nothing cached: nothing to do.
    out = await invalidate(api, {"collection": f"{c}-empty"})
    assert out["invalidated"] == 0 and out["skipped_pending"] == 0


# -- stats ------------------------------------------------------------------------------------


async def test_stats_fields_and_pending_counts_keys(
    api: httpx.AsyncClient, settings: Settings, redis: Any, c: str
) -> None:
    s = await stats(api)
    for name, kind in [
        ("pending", int),
        ("queued_jobs", int),
        ("dead_letters", int),
        ("workers", int),
        ("hits", int),
        ("misses", int),
    ]:
        assert isinstance(s[name], kind) and not isinstance(s[name], bool), name
    assert s["pending"] == 0
    assert s["oldest_pending_age_s"] is None
    assert s["dead_letters"] == 0

    for i in range(10):
        r = await api.put(f"/v1/{c}/one", json={"i": i})
        assert r.status_code in (200, 201)
    s = await stats(api)
    assert s["pending"] == 1  # ten writes to one key count once
    assert isinstance(s["oldest_pending_age_s"], float | int)
    assert s["oldest_pending_age_s"] >= 0
    await api.patch(
        f"/v1/{c}/one", content=b'{"j":1}', headers={"Content-Type": "application/merge-patch+json"}
    )
    await api.put(f"/v1/{c}/two", json=2)
    await api.delete(f"/v1/{c}/two")
    assert (await stats(api))["pending"] == 2

    base = await stats(api)
    assert (await api.get(f"/v1/{c}/one")).headers["x-cache"] == "hit"
    await api.get(f"/v1/{c}/one")
    s = await stats(api)
    assert s["hits"] == base["hits"] + 2
    assert s["misses"] == base["misses"]

    async with running_worker(settings):
        s = await wait_drained(api)
        assert s["pending"] == 0
        assert s["oldest_pending_age_s"] is None
        assert s["dead_letters"] == 0
        await wait_until(lambda: _workers(api), timeout=10)

    assert await redis.delete(entry_key(settings, c, "one")) == 1
    base = await stats(api)
    assert (await api.get(f"/v1/{c}/one")).headers["x-cache"] == "miss"
    assert (await api.get(f"/v1/{c}/never")).status_code == 404
    s = await stats(api)
    assert s["misses"] == base["misses"] + 2
    assert s["hits"] == base["hits"]


async def _workers(api: httpx.AsyncClient) -> bool:
    return bool((await stats(api))["workers"] >= 1)


# -- health -----------------------------------------------------------------------------------


async def test_healthz(api: httpx.AsyncClient) -> None:
    r = await api.get("/healthz")
    assert r.status_code == 200


async def test_readyz_names_redis_postgres_and_workers(
    api: httpx.AsyncClient, settings: Settings
) -> None:
    r = await api.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    for name in ("redis", "postgres", "workers"):
        assert isinstance(body[name], str) and body[name], name
    assert body["redis"] == "up"
    assert body["postgres"] == "up"
    no_workers = body["workers"]
    async with running_worker(settings):
        await wait_until(lambda: _workers(api), timeout=10)
        body = (await api.get("/readyz")).json()
        assert body["workers"] != no_workers


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_prometheus_text(
    api: httpx.AsyncClient, settings: Settings, redis: Any, c: str
) -> None:
    await api.put(f"/v1/{c}/a", json=1)
    await api.put(f"/v1/{c}/a", json=2)
    await api.put(f"/v1/{c}/b", json=3)
    await api.get(f"/v1/{c}/a")
    m = await metrics(api)
    for name in (
        "wbcache_pending",
        "wbcache_oldest_pending_age_seconds",
        "wbcache_flushed_writes_total",
        "wbcache_flush_failures_total",
        "wbcache_cache_hits_total",
        "wbcache_cache_misses_total",
    ):
        assert name in m, name
    assert m["wbcache_pending"] == 2 == (await stats(api))["pending"]
    assert m["wbcache_oldest_pending_age_seconds"] >= 0
    assert m["wbcache_cache_hits_total"] >= 1

    async with running_worker(settings):
        await wait_drained(api)
    m = await metrics(api)
    assert m["wbcache_pending"] == 0 == (await stats(api))["pending"]
    assert m["wbcache_oldest_pending_age_seconds"] == 0
    assert m["wbcache_flushed_writes_total"] >= 2
    assert m["wbcache_flush_failures_total"] == 0

    await redis.delete(entry_key(settings, c, "b"))
    misses = m["wbcache_cache_misses_total"]
    assert (await api.get(f"/v1/{c}/b")).headers["x-cache"] == "miss"
    assert (await metrics(api))["wbcache_cache_misses_total"] == misses + 1


# -- REDIS_PREFIX ------------------------------------------------------------------------------


async def test_every_redis_key_is_under_the_prefix(
    settings_factory: Callable[..., Settings], tmp_path: Path, c: str
) -> None:
    """REDIS_PREFIX is "the prefix of every Redis key the service owns, so it can share a
    Redis": on a Redis of its own, the API and a worker leave no key outside it."""
    with RedisServer(tmp_path / "redis") as server:
        settings = settings_factory(redis_url=server.url, redis_prefix="own:")
        async with running_api(settings) as api:
            await api.put(f"/v1/{c}/a", json=1)
            await api.put(f"/v1/{c}/b", json=2, headers={"Write-Mode": "through"})
            await api.delete(f"/v1/{c}/b")
            async with running_worker(settings):
                await wait_drained(api)
                await wait_until(lambda: _workers(api), timeout=10)
            await api.get(f"/v1/{c}/a")
            await api.post("/v1/invalidate", json={"collection": c})
            await api.get("/v1/stats")
        client = create_redis("test", settings)
        outside: list[str] = []
        try:
            async for k in client.scan_iter(count=10_000):
                if not k.startswith(b"own:"):
                    outside.append(k.decode())
        finally:
            await client.aclose(close_connection_pool=True)
    assert outside == []
