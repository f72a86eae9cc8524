"""POST /v1/batch answers each operation with what happened to it: one write that cannot
be done (its key needs Postgres, which is down) fails alone, and every operation goes the
way its collection's writes go (COLLECTION_WRITE_MODE, unless Write-Mode says otherwise)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from service.config import Settings
from tests.conftest import running_api, running_worker, wait_drained
from tests.integration.test_redis_faults import throwaway_redis

# A Postgres nobody answers on: port 1 is closed.
DOWN_URL = "postgresql://postgres@127.0.0.1:1/x"


@pytest.fixture
def c() -> str:
    return f"br{uuid.uuid4().hex[:12]}"


async def rows(pg: asyncpg.Connection, collection: str) -> dict[str, tuple[Any, int]]:
    found = await pg.fetch(
        "SELECT key, value::text AS value, version FROM records WHERE collection = $1",
        collection,
    )
    return {r["key"]: (json.loads(r["value"]), int(r["version"])) for r in found}


def put(c: str, key: str, doc: Any, **pre: str) -> dict[str, Any]:
    return {"op": "put", "collection": c, "key": key, "document": doc, **pre}


async def test_one_write_needing_postgres_fails_alone(
    api: httpx.AsyncClient,
    settings: Settings,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    c: str,
) -> None:
    # Cached keys (written through the API) and keys only Postgres knows.
    cached = [f"c{i}" for i in range(40)]
    etags: dict[str, str] = {}
    for key in cached:
        r = await api.put(f"/v1/{c}/{key}", json={"k": key, "n": 0})
        assert r.status_code == 201
        etags[key] = r.headers["etag"]
    for key in ("u0", "u1", "u2", "u3"):
        await pg.execute(
            "INSERT INTO records (collection, key, value, version, updated_at) "
            "VALUES ($1, $2, $3::jsonb, 500, now())",
            c,
            key,
            json.dumps({"stored": key}),
        )

    ops: list[dict[str, Any]] = [put(c, key, {"k": key, "n": 1}) for key in cached[:30]]
    ops += [
        put(c, "c30", {"k": "c30", "n": 1}, if_match=etags["c30"]),
        {"op": "delete", "collection": c, "key": "c31"},
        {"op": "delete", "collection": c, "key": "c32", "if_match": etags["c32"]},
        put(c, "c33", {"k": "c33", "n": 1}, if_none_match="*"),  # exists: 412
        put(c, "new", {"k": "new"}),  # blind PUT of an unknown key: needs no Postgres
        {"op": "get", "collection": c, "key": "c34"},
        # These need Postgres: an uncached key's version and existence.
        put(c, "u0", {"k": "u0", "n": 1}, if_match='"500"'),
        {"op": "delete", "collection": c, "key": "u1"},
        put(c, "u2", {"k": "u2", "n": 1}, if_none_match="*"),
        {"op": "get", "collection": c, "key": "u3"},
    ]
    needs_postgres = {"u0", "u1", "u2", "u3"}

    down = settings_factory(database_url=DOWN_URL)
    async with running_api(down) as down_api:
        r = await down_api.post("/v1/batch", json={"operations": ops})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        for op, res in zip(ops, results, strict=True):
            if op["key"] in needs_postgres:
                assert res["status"] == 503, (op, res)
                assert res["error"]["code"] == "postgres_unavailable", res
            elif op["key"] == "c33":
                assert res["status"] == 412, res
            elif op["key"] == "new":
                assert res["status"] == 201, res
            elif op["op"] == "delete":
                assert res["status"] == 204, res
            elif op["op"] == "get":
                assert res == {
                    "status": 200,
                    "version": int(etags["c34"][1:-1]),
                    "document": {
                        "k": "c34",
                        "n": 0,
                    },
                }
            else:
                assert res["status"] == 200, (op, res)
        # What was acknowledged is readable, at the version the batch reported.
        for op, res in zip(ops, results, strict=True):
            if op["op"] == "get" or res["status"] >= 300:
                continue
            got = await down_api.get(f"/v1/{c}/{op['key']}")
            if op["op"] == "delete":
                assert got.status_code == 404
            else:
                assert got.status_code == 200 and got.json() == op["document"]
                assert got.headers["etag"] == f'"{res["version"]}"'

    # Postgres is back: after a drain it holds exactly the writes reported 2xx.
    async with running_worker(settings):
        await wait_drained(api)
    expected: dict[str, tuple[Any, int]] = {
        key: ({"k": key, "n": 0}, int(etags[key][1:-1])) for key in cached
    }
    expected.update({key: ({"stored": key}, 500) for key in needs_postgres})
    for op, res in zip(ops, results, strict=True):
        if op["op"] == "get" or res["status"] >= 300:
            continue
        if op["op"] == "delete":
            del expected[op["key"]]
        else:
            expected[op["key"]] = (op["document"], res["version"])
    assert await rows(pg, c) == expected


async def test_batch_follows_each_collections_write_mode(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    orders, carts = f"{c}-orders", f"{c}-carts"
    settings = settings_factory(collection_write_mode={orders: "through"})
    async with running_api(settings) as api:  # no worker: only the batch can commit
        r = await api.post(
            "/v1/batch",
            json={"operations": [put(orders, "o1", {"total": 5}), put(carts, "c1", {"n": 1})]},
        )
        o1, c1 = r.json()["results"]
        assert o1["status"] == 201 and c1["status"] == 201
        assert await rows(pg, orders) == {"o1": ({"total": 5}, o1["version"])}
        assert await rows(pg, carts) == {}

        # The request's Write-Mode overrides the collection's default, both ways.
        r = await api.post(
            "/v1/batch",
            json={"operations": [put(orders, "o2", {"total": 6}), put(carts, "c2", {"n": 2})]},
            headers={"Write-Mode": "behind"},
        )
        assert [res["status"] for res in r.json()["results"]] == [201, 201]
        assert set(await rows(pg, orders)) == {"o1"}
        r = await api.post(
            "/v1/batch",
            json={"operations": [put(carts, "c3", {"n": 3})]},
            headers={"Write-Mode": "through"},
        )
        (c3,) = r.json()["results"]
        assert await rows(pg, carts) == {"c3": ({"n": 3}, c3["version"])}

        r = await api.post("/v1/batch", json={"operations": []}, headers={"Write-Mode": "sideways"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_write_mode"

    down = settings_factory(
        database_url=DOWN_URL, collection_write_mode={orders: "through"}, write_through_timeout=1.0
    )
    async with running_api(down) as down_api:
        r = await down_api.post(
            "/v1/batch",
            json={"operations": [put(orders, "o3", {"total": 7}), put(carts, "c4", {"n": 4})]},
        )
        o3, c4 = r.json()["results"]
        assert o3["status"] == 503 and o3["error"]["code"] == "not_persisted", o3
        assert c4["status"] == 201
        # Accepted and queued all the same: readable from Redis.
        assert (await down_api.get(f"/v1/{orders}/o3")).json() == {"total": 7}


async def test_a_batch_at_maxmemory_answers_each_write_503_and_writes_nothing(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, tmp_path: Path, c: str
) -> None:
    """A round's writes to one shard run in one script call; at maxmemory each of them is
    refused (503 redis_full) as its own call would have been, none is applied, and the
    reads of the batch still answer."""
    async with throwaway_redis(
        tmp_path / "redis", "--maxmemory", "6mb", "--maxmemory-policy", "volatile-lru"
    ) as server:
        async with running_api(settings_factory(redis_url=server.url)) as api:
            blob = "x" * 16_000
            versions: dict[str, str] = {}
            for i in range(2000):
                r = await api.put(f"/v1/{c}/k{i}", json={"i": i, "blob": blob})
                if r.status_code == 503:
                    break
                versions[f"k{i}"] = r.headers["etag"]
            assert r.status_code == 503 and len(versions) > 10, r.text
            control = Redis(port=server.port)
            used = (await control.info("memory"))["used_memory"]
            await control.config_set("maxmemory", used - 512 * 1024)
            await control.aclose()

            ops: list[dict[str, Any]] = [put(c, f"k{i}", {"i": -i}) for i in range(5)]
            ops += [
                {"op": "delete", "collection": c, "key": "k5"},
                put(c, "k6", {"i": -6}, if_match=versions["k6"]),
                {"op": "get", "collection": c, "key": "k7"},
            ]
            r = await api.post("/v1/batch", json={"operations": ops})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            for op, res in zip(ops[:-1], results, strict=False):
                assert res["status"] == 503, (op, res)
                assert res["error"]["code"] == "redis_full", res
            assert results[-1]["status"] == 200
            assert results[-1]["version"] == int(versions["k7"].strip('"'))
            for i in range(7):
                got = await api.get(f"/v1/{c}/k{i}")
                assert got.status_code == 200 and got.headers["etag"] == versions[f"k{i}"]
