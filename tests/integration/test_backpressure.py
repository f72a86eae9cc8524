"""Bounded memory (MAX_PENDING): past the limit a write to a new key answers 503 with
Retry-After and changes nothing, or is written through when so configured; writes to keys
already pending are always accepted; a drained queue accepts new keys again."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx

from service.config import Settings
from tests.conftest import running_api, running_worker, wait_drained


async def put(api: httpx.AsyncClient, key: str, doc: Any) -> httpx.Response:
    return await api.put(f"/v1/bp/{key}", json=doc)


async def pending(api: httpx.AsyncClient) -> int:
    n: int = (await api.get("/v1/stats")).json()["pending"]
    return n


async def test_past_max_pending_new_keys_get_503_and_change_nothing(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    settings = settings_factory(max_pending=20)
    async with running_api(settings) as api:
        for i in range(20):
            r = await put(api, f"k{i}", {"i": i})
            assert r.status_code == 201, r.text
        assert await pending(api) == 20

        r = await put(api, "k20", {"i": 20})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit() and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"].startswith("application/json")
        body = r.json()
        assert set(body) == {"error"}
        assert body["error"]["code"] == "backpressure"
        assert "MAX_PENDING" in body["error"]["message"]

        # Nothing changed: no entry, no queue mark, the key still reads as absent.
        entry = f"{settings.redis_prefix}e:bp:k20"
        assert await redis.exists(entry) == 0
        assert await redis.zscore(f"{settings.redis_prefix}dirty", "bp:k20") is None
        assert await pending(api) == 20
        assert (await api.get("/v1/bp/k20")).status_code == 404

        # A delete of a new key and a patch are refused the same way (both would add a
        # pending key) - the delete of an absent key is a 404 first, so write a row.
        await pg.execute(
            "INSERT INTO records (collection, key, value, version, updated_at) "
            "VALUES ('bp', 'row', '{\"a\": 1}', 5, now())"
        )
        d = await api.delete("/v1/bp/row")
        assert d.status_code == 503 and d.json()["error"]["code"] == "backpressure"
        p = await api.patch(
            "/v1/bp/row",
            content=b'{"b": 2}',
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert p.status_code == 503 and p.json()["error"]["code"] == "backpressure"
        assert (await api.get("/v1/bp/row")).json() == {"a": 1}

        # A key that is already pending is still accepted (it adds nothing to the queue).
        again = await put(api, "k3", {"i": 3, "again": True})
        assert again.status_code == 200, again.text
        assert (await api.get("/v1/bp/k3")).json() == {"i": 3, "again": True}
        assert await pending(api) == 20

        # Once a worker drains the queue, new keys are accepted again.
        async with running_worker(settings):
            await wait_drained(api)
        r = await put(api, "k20", {"i": 20})
        assert r.status_code == 201, r.text
        versions = {
            row["key"]: json.loads(row["value"])
            for row in await pg.fetch(
                "SELECT key, value::text AS value FROM records WHERE collection = 'bp'"
            )
        }
        assert len(versions) == 21  # k0..k19 and the foreign row
        assert versions["k3"] == {"i": 3, "again": True}


async def test_past_max_pending_writes_go_through_when_so_configured(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    settings = settings_factory(max_pending=5, backpressure_mode="through")
    async with running_api(settings) as api:
        for i in range(5):
            assert (await put(api, f"k{i}", {"i": i})).status_code == 201
        assert await pg.fetchval("SELECT count(*) FROM records") == 0

        for i in range(5, 8):
            r = await put(api, f"k{i}", {"i": i})
            assert r.status_code == 201, r.text
            version = r.json()["version"]
            # Written through: the row is in Postgres when the response arrives.
            row = await pg.fetchrow(
                "SELECT value::text AS value, version FROM records "
                "WHERE collection = 'bp' AND key = $1",
                f"k{i}",
            )
            assert row is not None, f"k{i} was not written through"
            assert (json.loads(row["value"]), row["version"]) == ({"i": i}, version)
        # ...and is not left pending: the queue holds only the first five.
        assert await pending(api) == 5
        got = await api.get("/v1/bp/k6")
        assert got.status_code == 200 and got.json() == {"i": 6}

        # Deletes past the limit go through too.
        d = await api.delete("/v1/bp/k6")
        assert d.status_code == 204
        assert await pg.fetchval("SELECT count(*) FROM records WHERE key = 'k6'") == 0
        assert await pending(api) == 5
        # The queued five still belong to the worker.
        async with running_worker(settings):
            await wait_drained(api)
        assert await pg.fetchval("SELECT count(*) FROM records") == 7


async def test_more_concurrent_requests_than_redis_connections_wait_instead_of_503(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    """redis-py's stock pool raises "Too many connections" past REDIS_MAX_CONNECTIONS,
    which the API would answer 503 (seen under wrk at 128 connections with a pool of 64):
    the service's pool queues the request until a connection is free."""
    settings = settings_factory(redis_max_connections=2)
    async with running_api(settings) as api:
        results = await asyncio.gather(
            *(put(api, f"c{i % 40}", {"i": i}) for i in range(200)),
            *(api.get(f"/v1/bp/c{i % 40}") for i in range(100)),
        )
        codes = sorted({r.status_code for r in results})
        assert set(codes) <= {200, 201, 404}, [r.text for r in results if r.status_code >= 500]
        assert await pending(api) == 40
        state = api._transport.app.state.wb  # type: ignore[attr-defined]
        pool = state.redis.connection_pool
        assert len(pool._in_use_connections) + len(pool._available_connections) <= 2
