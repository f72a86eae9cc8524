"""POST /v1/batch: per-operation results, order per key, same guarantees as single calls."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest
from arq.worker import Worker
from redis.exceptions import ResponseError

from service.adapters.postgres import PgPool
from service.adapters.redis import create_mux
from service.api.app import GC_GEN0_THRESHOLD
from service.config import Settings
from service.core.record_types import Op, Status, WriteCall, WriteResult
from service.core.records import RecordStore
from service.core.scripts import Scripts
from tests.conftest import running_api, wait_drained


async def test_mixed_operations_each_get_their_own_result(api: httpx.AsyncClient) -> None:
    await api.put("/v1/users/bob", json={"age": 30})
    etag = (await api.get("/v1/users/bob")).headers["etag"]
    ops = [
        {"op": "put", "collection": "users", "key": "alice", "document": {"n": 1}},
        {"op": "patch", "collection": "users", "key": "bob", "patch": {"x": 1}, "if_match": etag},
        {"op": "patch", "collection": "users", "key": "bob", "patch": {"y": 2}, "if_match": etag},
        {"op": "get", "collection": "users", "key": "alice"},
        {"op": "delete", "collection": "users", "key": "ghost"},
        {"op": "put", "collection": "BAD", "key": "k", "document": 1},
        {"op": "put", "collection": "users\n", "key": "k", "document": 1},
        {"op": "put", "collection": "users", "key": "nul", "document": {"a": "\x00"}},
        {"op": "get", "collection": "users", "key": "a/b"},
    ]
    r = await api.post("/v1/batch", json={"operations": ops})
    assert r.status_code == 200
    res = r.json()["results"]
    assert res[0]["status"] == 201 and res[0]["version"] > 0
    # Same key: in order, so the second patch sees the first's new version -> 412.
    assert res[1]["status"] == 200 and res[1]["document"] == {"age": 30, "x": 1}
    assert res[2]["status"] == 412 and res[2]["error"]["code"] == "precondition_failed"
    assert res[3] == {"status": 200, "version": res[0]["version"], "document": {"n": 1}}
    assert res[4]["status"] == 404
    assert res[5]["status"] == 422 and res[5]["error"]["code"] == "invalid_collection"
    assert res[6]["status"] == 422 and res[6]["error"]["code"] == "invalid_collection"
    assert res[7]["status"] == 422
    assert res[8]["status"] == 404
    # Nothing was written for the failed operations.
    assert (await api.get("/v1/users/nul")).status_code == 404
    assert (await api.get("/v1/users/bob")).json() == {"age": 30, "x": 1}


async def test_pipelined_rounds_match_single_calls(
    api: httpx.AsyncClient, pg: asyncpg.Connection, redis: Any
) -> None:
    """A round's puts, deletes and gets go to Redis in one pipeline each; keys that only
    Postgres knows take the single-key path, and a Redis that lost its scripts (SCRIPT
    FLUSH, as after a restart) is answered like any single call."""
    await pg.execute(
        "INSERT INTO records (collection, key, value, version, updated_at) VALUES "
        "('p', 'stored', '{\"s\": 1}', 500, now()), ('p', 'gone', '{\"g\": 1}', 600, now()),"
        "('p', 'read', '{\"r\": 1}', 700, now())"
    )
    await api.put("/v1/p/cached", json={"c": 1})
    cached_etag = (await api.get("/v1/p/cached")).headers["etag"]
    await redis.script_flush()
    ops: list[dict[str, Any]] = [
        # Postgres only: the version floor comes from Postgres, If-Match on its version.
        {
            "op": "put",
            "collection": "p",
            "key": "stored",
            "document": {"s": 2},
            "if_match": '"500"',
        },
        {"op": "delete", "collection": "p", "key": "gone"},
        {"op": "get", "collection": "p", "key": "read"},
        {
            "op": "put",
            "collection": "p",
            "key": "cached",
            "document": {"c": 2},
            "if_none_match": "*",
        },
        {
            "op": "put",
            "collection": "p",
            "key": "cached",
            "document": {"c": 3},
            "if_match": cached_etag,
        },
        # One new key, four operations in order.
        {"op": "put", "collection": "p", "key": "seq", "document": {"n": 1}},
        {"op": "put", "collection": "p", "key": "seq", "document": {"n": 2}},
        {"op": "get", "collection": "p", "key": "seq"},
        {"op": "delete", "collection": "p", "key": "seq"},
        {"op": "get", "collection": "p", "key": "seq"},
        {"op": "delete", "collection": "p", "key": "never"},
    ]
    r = await api.post("/v1/batch", json={"operations": ops})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert res[0]["status"] == 200 and res[0]["version"] > 500
    assert res[1]["status"] == 204 and res[1]["version"] > 600
    assert res[2] == {"status": 200, "version": 700, "document": {"r": 1}}
    assert res[3]["status"] == 412
    assert res[4]["status"] == 200 and res[4]["version"] > int(cached_etag.strip('"'))
    assert res[5]["status"] == 201 and res[6]["status"] == 200
    assert res[6]["version"] > res[5]["version"]
    assert res[7] == {"status": 200, "version": res[6]["version"], "document": {"n": 2}}
    assert res[8]["status"] == 204 and res[8]["version"] > res[6]["version"]
    assert res[9]["status"] == 404
    assert res[10]["status"] == 404
    # The single-key API agrees with every result.
    assert (await api.get("/v1/p/stored")).json() == {"s": 2}
    assert (await api.get("/v1/p/gone")).status_code == 404
    got = await api.get("/v1/p/cached")
    assert got.json() == {"c": 3} and got.headers["etag"] == f'"{res[4]["version"]}"'
    assert (await api.get("/v1/p/seq")).status_code == 404
    stats = (await api.get("/v1/stats")).json()
    assert stats["pending"] == 4  # stored, gone, cached, seq


async def test_batch_writes_are_persisted(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    ops: list[dict[str, Any]] = [
        {"op": "put", "collection": "b", "key": f"k{i}", "document": {"i": i}} for i in range(300)
    ]
    ops += [{"op": "delete", "collection": "b", "key": f"k{i}"} for i in range(0, 300, 3)]
    r = await api.post("/v1/batch", json={"operations": ops})
    versions: dict[str, tuple[str, int]] = {}
    for op, res in zip(ops, r.json()["results"], strict=True):
        assert res["status"] in (201, 204), res
        versions[op["key"]] = (op["op"], res["version"])
    await wait_drained(api)
    rows = {r["key"]: r["version"] for r in await pg.fetch("SELECT key, version FROM records")}
    for key, (kind, version) in versions.items():
        if kind == "delete":
            assert key not in rows
        else:
            assert rows[key] == version


async def test_a_full_batch_of_new_keys_is_written_whole(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    """1,000 puts of keys that are not cached each need Postgres' floor and a script of
    their own, at once. With few Redis connections they queue for one, as on one Redis:
    on a Cluster, redis-py's per-node pool refused the excess (MaxConnectionsError), and
    618 of the 1,000 answered 503."""
    settings = settings_factory(redis_max_connections=16)
    ops = [
        {"op": "put", "collection": "full", "key": f"k{i}", "document": {"i": i}}
        for i in range(1000)
    ]
    async with running_api(settings) as api:
        r = await api.post("/v1/batch", json={"operations": ops})
    assert r.status_code == 200
    statuses = Counter(res["status"] for res in r.json()["results"])
    assert statuses == {201: 1000}, statuses


async def test_batch_limits_and_bad_bodies(api: httpx.AsyncClient) -> None:
    too_many = [{"op": "get", "collection": "c", "key": f"{i}"} for i in range(1001)]
    assert (await api.post("/v1/batch", json={"operations": too_many})).status_code == 413
    bodies: list[Any] = [{}, {"operations": []}, {"operations": [{"op": "nope"}]}, [1]]
    for body in bodies:
        r = await api.post("/v1/batch", json=body)
        assert r.status_code == 422, body
        assert r.json()["error"]["code"] == "invalid_batch"
    r = await api.post("/v1/batch", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400


@pytest.mark.parametrize("shared_connection", [False, True])
async def test_an_error_reply_to_one_write_leaves_the_others_of_its_call(
    settings: Settings, pg: asyncpg.Connection, redis: Any, shared_connection: bool
) -> None:
    """One call of write_many.lua runs many writes: a Redis error reply to one write's
    command (here WRONGTYPE: its entry is not a hash) is that write's outcome alone, as
    its own EVALSHA's would be; the writes before and after it in the call are applied
    and answered. The same through the pooled pipeline and the shared connection (whose
    reader must turn an error inside the reply's array into redis-py's exception too)."""
    pool = PgPool("test", settings)
    mux = create_mux(redis, settings) if shared_connection else None
    store = RecordStore(redis, pool, settings, Scripts.register(redis), mux=mux)
    keys = [f"k{i}" for i in range(7)]
    try:
        first = await store.write_many([WriteCall(Op.PUT, "we", k, b"1") for k in keys])
        assert all(isinstance(r, WriteResult) and r.status is Status.OK for r in first)
        broken = store.shards.for_record("we", "k3").entry("we", "k3")
        await redis.delete(broken)
        await redis.set(broken, "not a hash")
        again = await store.write_many([WriteCall(Op.PUT, "we", k, b"2") for k in keys])
        for key, before, after in zip(keys, first, again, strict=True):
            if key == "k3":
                assert isinstance(after, ResponseError) and "WRONGTYPE" in str(after), after
                continue
            assert isinstance(before, WriteResult) and isinstance(after, WriteResult)
            assert after.status is Status.OK and not after.created
            assert after.version > before.version
            record = await store.read("we", key)
            assert (record.version, record.document) == (after.version, b"2")
    finally:
        await pool.close()
        if mux is not None:
            await mux.aclose()


async def test_the_api_collects_young_objects_less_often_while_it_runs(
    settings: Settings, redis: Any
) -> None:
    """A batch's parsed documents live until it answers: the API raises the young
    generation's threshold while it serves (service/api/app.py) and puts it back after."""
    before = gc.get_threshold()
    async with running_api(settings) as api:
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, *before[1:])
        assert (await api.get("/healthz")).status_code == 200
    assert gc.get_threshold() == before
