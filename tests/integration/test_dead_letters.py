"""Dead letters against the real Redis and Postgres: writes Postgres refuses for good
(here: a CHECK constraint, SQLSTATE 23514) are isolated from the rest of their batch,
listed with their error, still served from the cache, and retried or dropped by an
operator; a newer write to the key supersedes them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
from arq.worker import Worker
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.conftest import running_worker, wait_until

POISON = [7, 250, 493]
N = 500


@contextlib.asynccontextmanager
async def poison_constraint(pg: asyncpg.Connection) -> AsyncIterator[Callable[[], Any]]:
    """Make Postgres refuse, for good, every document with a "poison" member. Yields a
    function that drops the constraint early; it is dropped at the end in any case (other
    tests share the database)."""
    name = f"wbt_poison_{uuid.uuid4().hex[:10]}"
    await pg.execute(f"ALTER TABLE records ADD CONSTRAINT {name} CHECK (NOT (value ? 'poison'))")

    async def drop() -> None:
        await pg.execute(f"ALTER TABLE records DROP CONSTRAINT IF EXISTS {name}")

    try:
        yield drop
    finally:
        await drop()


async def stats(api: httpx.AsyncClient) -> dict[str, Any]:
    r = await api.get("/v1/stats")
    assert r.status_code == 200, r.text
    s: dict[str, Any] = r.json()
    return s


async def listed(api: httpx.AsyncClient, collection: str) -> dict[str, int]:
    """GET /v1/{collection}: each listed key's version."""
    r = await api.get(f"/v1/{collection}")
    assert r.status_code == 200, r.text
    return {i["key"]: i["version"] for i in r.json()["items"]}


async def settled(api: httpx.AsyncClient, dead: int, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until nothing is pending and exactly ``dead`` writes are dead-lettered."""

    async def check() -> dict[str, Any] | None:
        s = await stats(api)
        return s if s["pending"] == 0 and s["dead_letters"] == dead else None

    result: dict[str, Any] = await wait_until(check, timeout)
    return result


async def rows(pg: asyncpg.Connection, collection: str) -> dict[str, tuple[Any, int]]:
    found = await pg.fetch(
        "SELECT key, value::text AS value, version FROM records WHERE collection = $1",
        collection,
    )
    return {r["key"]: (json.loads(r["value"]), int(r["version"])) for r in found}


async def put(api: httpx.AsyncClient, collection: str, key: str, doc: Any) -> int:
    r = await api.put(f"/v1/{collection}/{key}", json=doc)
    assert r.status_code in (200, 201), r.text
    version: int = r.json()["version"]
    return version


async def put_many(api: httpx.AsyncClient, collection: str, docs: dict[str, Any]) -> dict[str, int]:
    """PUT every document (20 at a time); returns the acknowledged versions."""
    sem = asyncio.Semaphore(20)

    async def one(key: str, doc: Any) -> tuple[str, int]:
        async with sem:
            return key, await put(api, collection, key, doc)

    done = await asyncio.gather(*(one(k, d) for k, d in docs.items()))
    return dict(done)


def documents(n: int = N, poison: list[int] = POISON) -> dict[str, Any]:
    docs: dict[str, Any] = {}
    for i in range(n):
        doc: dict[str, Any] = {"i": i, "text": f"document {i}"}
        if i in poison:
            doc["poison"] = True
        docs[f"k{i:03d}"] = doc
    return docs


async def list_all(api: httpx.AsyncClient, limit: int) -> list[list[dict[str, Any]]]:
    """Follow the cursor from the first page to the last; returns the pages."""
    pages: list[list[dict[str, Any]]] = []
    params: dict[str, Any] = {"limit": limit}
    for _ in range(100):
        r = await api.get("/v1/dead-letters", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body["items"])
        if body["next_cursor"] is None:
            return pages
        params = {"limit": limit, "cursor": body["next_cursor"]}
    raise AssertionError("the cursor never came back to the end")


def metric(text: str, sample_name: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample_name and not s.labels:
                return float(s.value)
    raise AssertionError(f"no sample {sample_name}")


async def test_poison_writes_are_dead_lettered_and_retried_after_the_fix(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    docs = documents()
    poison_keys = {f"k{i:03d}" for i in POISON}
    async with poison_constraint(pg) as fix:
        acked = await put_many(api, "dl", docs)
        s = await settled(api, dead=3)
        assert s["pending"] == 0 and s["dead_letters"] == 3

        # 497 persisted with their versions; the 3 poison writes are not.
        stored = await rows(pg, "dl")
        assert set(stored) == set(docs) - poison_keys
        for key, (value, version) in stored.items():
            assert (value, version) == (docs[key], acked[key]), key

        # The dead letters say what, which version, and why.
        r = await api.get("/v1/dead-letters")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == 3
        assert body["next_cursor"] is None
        by_key = {d["key"]: d for d in body["items"]}
        assert set(by_key) == poison_keys
        for key, d in by_key.items():
            assert d["collection"] == "dl"
            assert d["version"] == acked[key]
            assert d["sqlstate"] == "23514"
            assert "check constraint" in d["error"] and "wbt_poison_" in d["error"], d

        # Following the cursor lists every dead letter exactly once.
        pages = await list_all(api, limit=2)
        assert sorted(d["key"] for p in pages for d in p) == sorted(poison_keys)

        # A dead-lettered key still reads its newest value, from the cache, flagged.
        for key in poison_keys:
            got = await api.get(f"/v1/dl/{key}")
            assert got.status_code == 200
            assert got.json() == docs[key]
            assert got.headers["etag"] == f'"{acked[key]}"'
            assert got.headers["x-cache"] == "hit"
            assert got.headers["x-dead-letter"] == "true"
        ok = await api.get("/v1/dl/k000")
        assert ok.status_code == 200 and "x-dead-letter" not in ok.headers

        # Fix the cause, then retry one by name...
        await fix()
        first, *rest = sorted(poison_keys)
        r = await api.post(
            "/v1/dead-letters:retry", json={"items": [{"collection": "dl", "key": first}]}
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"retried": 1}
        await settled(api, dead=2)
        stored = await rows(pg, "dl")
        assert stored[first] == (docs[first], acked[first])
        assert not set(rest) & set(stored)

        # ...and the rest with no body at all (= every dead letter).
        r = await api.post("/v1/dead-letters:retry")
        assert r.status_code == 200, r.text
        assert r.json() == {"retried": 2}
        await settled(api, dead=0)
        stored = await rows(pg, "dl")
        assert len(stored) == N
        for key in poison_keys:
            assert stored[key] == (docs[key], acked[key])
            got = await api.get(f"/v1/dl/{key}")
            assert got.status_code == 200 and "x-dead-letter" not in got.headers
        empty = (await api.get("/v1/dead-letters")).json()
        assert empty["items"] == [] and empty["total"] == 0


async def test_dead_letter_pages_hold_at_most_limit_items(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    # Enough of them that some share a hash bucket (a bucket is what one HSCAN step returns).
    keys = sorted(f"p{i:02d}" for i in range(16))
    async with poison_constraint(pg):
        for key in keys:
            await put(api, "dl", key, {"poison": key})
        await put(api, "dl", "fine", {"ok": True})
        await settled(api, dead=len(keys))
        for limit in (1, 2):
            pages = await list_all(api, limit=limit)
            assert all(len(p) <= limit for p in pages), (limit, [len(p) for p in pages])
            assert sorted(d["key"] for p in pages for d in p) == keys
            # No page but the last may be empty (a client stops at next_cursor = null).
            assert all(pages[:-1]), [len(p) for p in pages]


async def test_retry_with_the_cause_unfixed_dead_letters_again(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    async with poison_constraint(pg):
        v = await put(api, "dl", "bad", {"poison": 1})
        await settled(api, dead=1)
        r = await api.post("/v1/dead-letters:retry", json={})
        assert r.status_code == 200 and r.json() == {"retried": 1}
        await settled(api, dead=1)
        (d,) = (await api.get("/v1/dead-letters")).json()["items"]
        assert (d["key"], d["version"], d["sqlstate"]) == ("bad", v, "23514")
        assert await rows(pg, "dl") == {}


async def test_drop_discards_the_write_and_reads_show_postgres(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    # "old" has a persisted row; "new" never reached Postgres.
    v_old = await put(api, "dl", "old", {"n": 1})
    await settled(api, dead=0)
    assert (await rows(pg, "dl"))["old"] == ({"n": 1}, v_old)

    async with poison_constraint(pg):
        v_bad = await put(api, "dl", "old", {"n": 2, "poison": True})
        await put(api, "dl", "new", {"poison": True})
        await put(api, "dl", "x1", {"poison": 1})
        await put(api, "dl", "x2", {"poison": 2})
        await settled(api, dead=4)
        # A listing shows what reads show: the dead-lettered writes.
        listing = await listed(api, "dl")
        assert sorted(listing) == ["new", "old", "x1", "x2"] and listing["old"] == v_bad

        r = await api.post(
            "/v1/dead-letters:drop",
            json={
                "items": [{"collection": "dl", "key": "old"}, {"collection": "dl", "key": "new"}]
            },
        )
        assert r.status_code == 200, r.text
        assert r.json() == {"dropped": 2}
        s = await stats(api)
        assert s["dead_letters"] == 2 and s["pending"] == 0

        # The next read shows Postgres' state, loaded from Postgres.
        got = await api.get("/v1/dl/old")
        assert got.status_code == 200
        assert got.json() == {"n": 1}
        assert got.headers["etag"] == f'"{v_old}"'
        assert got.headers["x-cache"] == "miss"
        assert "x-dead-letter" not in got.headers
        gone = await api.get("/v1/dl/new")
        assert gone.status_code == 404
        assert gone.headers["x-cache"] == "miss"
        assert gone.json()["error"]["code"] == "not_found"
        listing = await listed(api, "dl")
        assert sorted(listing) == ["old", "x1", "x2"] and listing["old"] == v_old

        # No body: drop them all.
        r = await api.post("/v1/dead-letters:drop")
        assert r.status_code == 200 and r.json() == {"dropped": 2}
        s = await stats(api)
        assert s["dead_letters"] == 0 and s["pending"] == 0
        for key in ("x1", "x2"):
            assert (await api.get(f"/v1/dl/{key}")).status_code == 404
        assert await listed(api, "dl") == {"old": v_old}

    # The dropped writes never reach Postgres; a later write gets a newer version.
    assert await rows(pg, "dl") == {"old": ({"n": 1}, v_old)}
    v_next = await put(api, "dl", "old", {"n": 3})
    assert v_next > v_bad > v_old
    await settled(api, dead=0)
    assert (await rows(pg, "dl"))["old"] == ({"n": 3}, v_next)


async def test_a_new_write_supersedes_a_dead_letter(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    async with poison_constraint(pg):
        v1 = await put(api, "dl", "k", {"poison": True})
        await put(api, "dl", "other", {"poison": True})
        await settled(api, dead=2)
        v2 = await put(api, "dl", "k", {"fixed": True})
        assert v2 > v1
        # Superseded at once: the dead letter is gone the moment the write is accepted.
        listed = (await api.get("/v1/dead-letters")).json()["items"]
        assert [d["key"] for d in listed] == ["other"]
        assert (await stats(api))["dead_letters"] == 1
        await settled(api, dead=1)
        assert await rows(pg, "dl") == {"k": ({"fixed": True}, v2)}
        got = await api.get("/v1/dl/k")
        assert got.status_code == 200 and got.json() == {"fixed": True}
        assert "x-dead-letter" not in got.headers


async def test_a_delete_supersedes_a_dead_letter(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    v0 = await put(api, "dl", "k", {"n": 0})
    await settled(api, dead=0)
    async with poison_constraint(pg):
        await put(api, "dl", "k", {"poison": True})
        await settled(api, dead=1)
        r = await api.delete("/v1/dl/k")
        assert r.status_code == 204
        await settled(api, dead=0)
        assert await rows(pg, "dl") == {}
        tomb = await pg.fetchval(
            "SELECT version FROM tombstones WHERE collection = 'dl' AND key = 'k'"
        )
        assert tomb is not None and tomb > v0
        assert (await api.get("/v1/dl/k")).status_code == 404


async def test_the_split_isolates_poison_within_one_batch(
    api: httpx.AsyncClient, pg: asyncpg.Connection, settings_factory: Callable[..., Settings]
) -> None:
    docs = documents()
    poison_keys = {f"k{i:03d}" for i in POISON}
    async with poison_constraint(pg):
        # Everything is queued before any worker runs; with no write delay the first
        # claim takes all 500 keys at once.
        acked = await put_many(api, "dl", docs)
        assert (await stats(api))["pending"] == N
        async with running_worker(settings_factory(batch_size=1000, write_delay_ms=0)):
            await settled(api, dead=3)
        stored = await rows(pg, "dl")
        assert set(stored) == set(docs) - poison_keys
        assert all(stored[k] == (docs[k], acked[k]) for k in stored)
        dead = (await api.get("/v1/dead-letters")).json()["items"]
        assert {d["key"] for d in dead} == poison_keys
        assert all(d["sqlstate"] == "23514" for d in dead)
        # It really was one batch: one observation of 500 keys.
        text = (await api.get("/metrics")).text
        assert metric(text, "wbcache_flush_batch_size_count") == 1
        assert metric(text, "wbcache_flush_batch_size_sum") == N
        assert metric(text, "wbcache_flushed_writes_total") == N - 3
        assert metric(text, "wbcache_dead_lettered_total") == 3
