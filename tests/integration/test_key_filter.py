"""The key filter (service/core/key_filter.py) against the real Redis and Postgres: once
complete, a write to a key never written reads no Postgres (proved with an API whose
Postgres does not exist); a key Postgres holds (row or tombstone) is never taken for a new
one, through a loss of the filter, a build, and evictions of the cache entries."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.adapters.postgres import PgPool
from service.adapters.redis import close_redis, connect_redis, create_mux
from service.config import Settings
from service.core import repository
from service.core.flusher import Flusher
from service.core.key_filter import complete
from service.core.key_filter_build import complete_filters
from service.core.record_types import Op, Status, WriteCall, WriteResult
from service.core.records import RecordStore
from service.core.scripts import Scripts
from tests.conftest import running_api
from tests.integration.test_redis_faults import throwaway_redis

# Nothing listens there: an API given this Postgres answers 503 to anything that reads it.
NO_POSTGRES = "postgresql://postgres@127.0.0.1:9/nothing"


async def _build(f: Flusher) -> list[int]:
    return await complete_filters(f.redis, f.pg, f.shards, f.key_filter, f.scripts)


async def _flush_all(f: Flusher) -> None:
    while (batch := await f.claim()) is not None:
        assert await f.flush_batch(batch)


async def _evict(f: Flusher, collection: str, key: str) -> None:
    """The entry's clean copy gone, as Redis' eviction or CLEAN_TTL_SECONDS would."""
    assert await f.redis.delete(f.shards.for_record(collection, key).entry(collection, key))


async def _filter_value(f: Flusher, collection: str, key: str) -> bytes:
    value: bytes = await f.redis.get(f.key_filter.key(f.shards.for_record(collection, key)))
    return value


async def test_writes_to_new_keys_read_no_postgres(
    flusher: Flusher, api: httpx.AsyncClient, settings_factory: Callable[..., Settings]
) -> None:
    assert await _build(flusher) == list(range(len(flusher.shards)))
    assert await _build(flusher) == []  # complete: nothing more to do
    # This API's Postgres does not exist: every answer below comes from Redis alone.
    async with running_api(settings_factory(database_url=NO_POSTGRES)) as blind:
        r = await blind.put("/v1/kf/a", json={"a": 1}, headers={"If-None-Match": "*"})
        assert r.status_code == 201, r.text
        assert (await blind.put("/v1/kf/a", json={"a": 2})).status_code == 200
        # Never written: a create; absent for If-Match, DELETE and PATCH.
        assert (await blind.put("/v1/kf/b", json={"b": 1})).status_code == 201
        r = await blind.put("/v1/kf/c", json={}, headers={"If-Match": '"1"'})
        assert r.status_code == 412, r.text
        assert (await blind.delete("/v1/kf/d")).status_code == 404
        assert (await blind.get("/v1/kf/d")).status_code == 404
        merge = {"Content-Type": "application/merge-patch+json"}
        assert (await blind.patch("/v1/kf/e", content=b"{}", headers=merge)).status_code == 404
        r = await blind.post(
            "/v1/batch",
            json={
                "operations": [
                    {"op": "put", "collection": "kf", "key": f"n{i}", "document": {}}
                    for i in range(20)
                ]
            },
        )
        assert [x["status"] for x in r.json()["results"]] == [201] * 20, r.text
        # Once its entry is evicted, a key written before must come from Postgres: 503.
        await _evict(flusher, "kf", "b")
        r = await blind.put("/v1/kf/b", json={"b": 2}, headers={"If-None-Match": "*"})
        assert r.status_code == 503, r.text
        assert (await blind.get("/v1/kf/b")).status_code == 503
    for key in ["a", "b", "n0", "n19"]:
        assert flusher.key_filter.may_hold(await _filter_value(flusher, "kf", key), f"kf:{key}")


async def test_a_batch_of_new_keys_is_one_call_with_no_fallback(
    flusher: Flusher, settings_factory: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_many through the shared connection carries that server's run_id, so its
    writes to never-written keys are creates in the one call: none falls back to the
    single-key path (a round trip per write, after the batch's own)."""
    assert await _build(flusher) == list(range(len(flusher.shards)))
    settings = settings_factory(database_url=NO_POSTGRES)
    mux = create_mux(flusher.redis, settings)
    assert mux is not None
    pool = PgPool("test", settings)
    store = RecordStore(flusher.redis, pool, settings, flusher.scripts, mux=mux)

    async def no_single_write(call: WriteCall) -> WriteResult:
        raise AssertionError(f"{call.key} fell back to the single-key path")

    monkeypatch.setattr(store, "write", no_single_write)
    try:
        results = await store.write_many(
            [WriteCall(Op.PUT, "kfb", f"n{i}", b"{}") for i in range(50)]
        )
    finally:
        await pool.close()
        await mux.aclose()
    assert all(isinstance(r, WriteResult) and r.status is Status.OK for r in results), results
    assert all(isinstance(r, WriteResult) and r.created for r in results)


async def test_a_key_postgres_holds_is_never_new(
    flusher: Flusher,
    api: httpx.AsyncClient,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows and tombstones in Postgres, a queued write, a write while the filter is being
    rebuilt: after the build each is known, so once evicted it is read from Postgres (200,
    412) and not taken for new (201)."""
    f = Flusher(flusher.redis, flusher.pg, flusher.settings, flusher.scripts)
    f.settings = f.settings.model_copy(update={"write_delay_ms": 0})
    assert (await api.put("/v1/kf/row", json={"v": 1})).status_code == 201
    assert (await api.put("/v1/kf/gone", json={"v": 1})).status_code == 201
    await _flush_all(f)
    assert (await api.delete("/v1/kf/gone")).status_code == 204
    await _flush_all(f)
    assert await pg.fetchval("SELECT count(*) FROM tombstones WHERE key = 'gone'") == 1
    assert (await api.put("/v1/kf/queued", json={"v": 1})).status_code == 201

    # Redis loses the filter (its data, say): until a worker completes it again, writes
    # read Postgres as before. A write during the build (which first creates an
    # incomplete bitmap) marks its key: the build's scans may have missed it.
    for k in f.shards:
        await f.redis.delete(f.key_filter.key(k))
    assert (await api.put("/v1/kf/before", json={"v": 1})).status_code == 201
    assert await f.redis.get(f.key_filter.key(f.shards.for_record("kf", "before"))) is None
    real_all_keys = repository.all_keys

    async def write_during_the_scan(pool: Any, batch: int = 10_000) -> AsyncIterator[list[str]]:
        assert (await api.put("/v1/kf/during", json={"v": 1})).status_code == 201
        value = await _filter_value(f, "kf", "during")
        assert not complete(value, f.key_filter) and f.key_filter.may_hold(value, "kf:during")
        async for chunk in real_all_keys(pool, batch):
            yield chunk

    monkeypatch.setattr(repository, "all_keys", write_during_the_scan)
    assert await _build(f) != []
    assert complete(await _filter_value(f, "kf", "during"), f.key_filter)
    await _flush_all(f)
    for key in ["row", "gone", "queued", "before", "during"]:
        assert f.key_filter.may_hold(await _filter_value(f, "kf", key), f"kf:{key}"), key
        await _evict(f, "kf", key)
    assert (await api.put("/v1/kf/row", json={"v": 2})).status_code == 200
    r = await api.put("/v1/kf/queued", json={"v": 2}, headers={"If-None-Match": "*"})
    assert r.status_code == 412, r.text
    gone = await pg.fetchval("SELECT version FROM tombstones WHERE key = 'gone'")
    r = await api.put("/v1/kf/gone", json={"v": 2})
    assert r.status_code == 201 and r.json()["version"] > gone, r.text
    assert (await api.put("/v1/kf/new", json={"v": 1})).status_code == 201


async def test_the_filter_is_trusted_only_on_the_server_that_completed_it(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """A restart (as a failover to a replica) may lose filter bits of keys whose rows
    reached Postgres meanwhile. Modelled by a row the filter never saw: trusted on the
    server that completed the filter, it would be taken for new (201); after the restart
    that server is another run, so the write reads Postgres (412) until a worker has
    completed the filter again there."""
    async with throwaway_redis(tmp_path / "redis", aof=True) as server:
        settings = settings_factory(redis_url=server.url)
        client = connect_redis("test-flusher", settings)
        pool = PgPool("test-flusher", settings)
        f = Flusher(client, pool, settings, Scripts.register(client))
        try:
            assert await _build(f) == [0]
            for key in ("before", "after"):
                await pg.execute(
                    "INSERT INTO records (collection, key, value, version, updated_at) "
                    "VALUES ('kf', $1, '{}', 5, now())",
                    key,
                )
            once = {"If-None-Match": "*"}
            async with running_api(settings) as api:
                r = await api.put("/v1/kf/before", json={}, headers=once)
                assert r.status_code == 201, r.text  # the filter's word, unchecked
            await asyncio.to_thread(server.restart)
            async with running_api(settings) as api:
                r = await api.put("/v1/kf/after", json={}, headers=once)
                assert r.status_code == 412, r.text
                assert await _build(f) == [0]  # completed again, on this run
                r = await api.put("/v1/kf/after", json={}, headers=once)
                assert r.status_code == 412, r.text
                assert (await api.put("/v1/kf/new", json={}, headers=once)).status_code == 201
        finally:
            await pool.close()
            await close_redis(client)
