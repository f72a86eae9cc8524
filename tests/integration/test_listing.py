"""GET /v1/{collection}: keys in byte order, prefix, keyset pages, and read-your-writes
against the write-behind queue (a pending write is listed, a pending delete is not), from
any API process, across shards, while writes and flushes go on."""

from __future__ import annotations

import asyncio
import random
import re
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from service.config import Settings
from service.core.shards import Shards
from tests.conftest import running_api, running_worker, wait_drained

# Byte order (UTF-8), not the database's collation: 'B' < 'a', 'Z' < 'a', 'é' > 'z'.
KEYS = ["B", "Z", "a", "a b", "a%", "a/b", "ab", "a\u00ff", "b", "z", "é", "日本", "😀"]


@pytest.fixture
def c() -> str:
    return f"l{uuid.uuid4().hex[:12]}"


async def insert_rows(pg: asyncpg.Connection, c: str, docs: dict[str, Any]) -> None:
    """Rows Postgres holds already (persisted earlier, nothing pending in Redis)."""
    await pg.executemany(
        "INSERT INTO records (collection, key, value, version, updated_at) "
        "VALUES ($1, $2, $3::jsonb, 7, now())",
        [(c, k, f'{{"k": "{k}"}}') for k in docs],
    )


async def list_all(
    api: httpx.AsyncClient, c: str, limit: int, **params: str
) -> tuple[list[str], int]:
    """Every key, page after page; and the number of pages."""
    keys: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {"limit": str(limit), **params}
        if cursor is not None:
            query["cursor"] = cursor
        r = await api.get(f"/v1/{c}", params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        assert len(body["items"]) <= limit
        keys += [item["key"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return keys, pages
        assert pages < 10_000


def byte_order(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


@pytest.fixture(params=[None, 4], ids=["default-shards", "4-shards"])
def sharded(request: pytest.FixtureRequest, settings_factory: Callable[..., Settings]) -> Settings:
    """The topology's own shards, and 4 (a listing merges the shards' pending keys)."""
    shards: int | None = request.param
    return settings_factory(**({"redis_shards": shards} if shards else {}))


async def test_order_prefix_pages_and_pending_state(
    sharded: Settings, pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    settings = sharded
    persisted = KEYS[::2]
    await insert_rows(pg, c, dict.fromkeys(persisted))
    # No worker: every write below stays pending.
    async with running_api(settings) as writer, running_api(settings) as reader:
        for k in KEYS[1::2]:
            r = await writer.put(f"/v1/{c}/{k.replace('/', '%2F')}", json={"new": k})
            assert r.status_code == 201, r.text
        assert (await writer.delete(f"/v1/{c}/b")).status_code == 204  # a persisted key
        assert (await writer.delete(f"/v1/{c}/a%2Fb")).status_code == 204  # a pending one
        r = await writer.put(f"/v1/{c}/a", json={"replaced": True})  # persisted, replaced
        assert r.status_code == 200
        expected = byte_order([k for k in KEYS if k not in ("b", "a/b")])
        assert (await writer.get("/v1/stats")).json()["pending"] > 0

        # Another API process sees the queue: one page, then every page size.
        r = await reader.get(f"/v1/{c}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert [i["key"] for i in body["items"]] == expected
        assert body["next_cursor"] is None and body["collection"] == c
        versions = {i["key"]: i["version"] for i in body["items"]}
        assert versions["B"] == 7 and versions["Z"] > 7 and versions["a"] > 7
        assert "document" not in body["items"][0]
        for limit in (1, 2, 3, 5, 100):
            keys, pages = await list_all(reader, c, limit)
            assert keys == expected, limit
            assert pages == -(-len(expected) // limit)  # no empty last page

        r = await reader.get(f"/v1/{c}", params={"include": "documents", "prefix": "a"})
        docs = {i["key"]: i["document"] for i in r.json()["items"]}
        assert docs == {
            "a": {"replaced": True},
            "a b": {"new": "a b"},
            "a%": {"k": "a%"},
            "ab": {"k": "ab"},
            "a\u00ff": {"new": "a\u00ff"},
        }
        assert (await list_all(reader, c, 2, prefix="a"))[0] == list(docs)
        assert (await list_all(reader, c, 1, prefix="日"))[0] == ["日本"]
        assert (await list_all(reader, c, 1, prefix="x"))[0] == []
        assert (await list_all(reader, c, 2, prefix="\U0010ffff"))[0] == []

        # Once persisted, the same listing from Postgres alone.
        async with running_worker(settings):
            await wait_drained(reader)
        assert (await list_all(reader, c, 3))[0] == expected
        # Nothing pending: every shard's index of pending keys is empty again.
        for shard in Shards.from_settings(settings):
            assert await redis.zcard(shard.pending_keys) == 0


async def test_more_pending_deletes_than_a_page(
    sharded: Settings, pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    """A page's worth of pending deletes hides as many rows: the page reads on past them
    (Redis' slice of pending keys bounds what Postgres may answer for)."""
    settings = sharded
    doomed = [f"a{i:02d}" for i in range(30)]
    await insert_rows(pg, c, dict.fromkeys([*doomed, "z0", "z1"]))
    async with running_api(settings) as api:
        for k in doomed:
            assert (await api.delete(f"/v1/{c}/{k}")).status_code == 204
        for k in ("m0", "m1", "m2"):
            assert (await api.put(f"/v1/{c}/{k}", json=k)).status_code == 201
        expected = ["m0", "m1", "m2", "z0", "z1"]
        for limit in (1, 2, 4, 100):
            assert (await list_all(api, c, limit))[0] == expected, limit


async def test_pages_while_writes_and_flushes_go_on(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    """Keys that exist throughout are listed exactly once, in order, whatever is written,
    deleted and flushed between (and during) the pages."""
    settings = settings_factory(redis_shards=3, write_delay_ms=0)
    stable = [f"s{i:03d}" for i in range(120)]
    await insert_rows(pg, c, dict.fromkeys(stable[::2]))
    rng = random.Random(14)
    async with running_api(settings) as api, running_worker(settings):
        for k in stable[1::2]:
            assert (await api.put(f"/v1/{c}/{k}", json={"i": k})).status_code == 201
        stop = asyncio.Event()

        async def churn() -> int:
            n = 0
            while not stop.is_set():
                k = f"{rng.choice('ls')}{rng.randrange(130):03d}x"  # between stable keys
                if rng.random() < 0.5:
                    await api.put(f"/v1/{c}/{k}", json={"n": n})
                else:
                    await api.delete(f"/v1/{c}/{k}")
                # Stable keys are rewritten (they stay), pending or being flushed.
                await api.put(f"/v1/{c}/{rng.choice(stable)}", json={"n": n})
                n += 1
            return n

        writer = asyncio.create_task(churn())
        try:
            for limit in (7, 1, 50):
                keys, _ = await list_all(api, c, limit)
                assert keys == byte_order(keys) and len(set(keys)) == len(keys), limit
                assert [k for k in keys if k in set(stable)] == stable, limit
        finally:
            stop.set()
            assert await writer > 0


async def test_bad_parameters_are_422_and_auth(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    async with running_api(settings_factory(api_keys="rk:read,wk:write")) as api:
        read = {"Authorization": "Bearer rk"}
        bad = [
            (f"/v1/{c}?limit=0", "invalid_limit"),
            (f"/v1/{c}?limit=1001", "invalid_limit"),
            (f"/v1/{c}?limit=ten", "invalid_limit"),
            (f"/v1/{c}?cursor=%21%21", "invalid_cursor"),
            (f"/v1/{c}?cursor=_w", "invalid_cursor"),  # base64 of a byte that is not UTF-8
            (f"/v1/{c}?include=everything", "invalid_include"),
            (f"/v1/{c}?prefix=a%01", "invalid_prefix"),
            (f"/v1/{c}?sort=desc", "invalid_parameter"),
            ("/v1/Not_A_Collection", "invalid_collection"),
        ]
        for path, code in bad:
            r = await api.get(path, headers=read)
            assert r.status_code == 422, (path, r.text)
            assert r.json()["error"]["code"] == code, path
            assert r.json()["error"]["message"]
        assert (await api.get(f"/v1/{c}")).status_code == 401
        r = await api.get(f"/v1/{c}", headers=read)
        assert r.status_code == 200
        assert r.json() == {"collection": c, "items": [], "next_cursor": None}
        # The fixed paths under /v1 are still theirs.
        assert "pending" in (await api.get("/v1/stats", headers=read)).json()


async def test_the_page_uses_the_byte_order_index(
    pg: asyncpg.Connection, servers: Any, c: str
) -> None:
    """The page is an index range scan that stops after it (plain or partitioned table)."""
    await insert_rows(pg, c, {f"k{i:05d}": None for i in range(2000)})
    await pg.execute("ANALYZE records")
    await pg.execute("SET enable_seqscan = off")  # a tiny table: judge the plan, not costs
    plan = "\n".join(
        r[0]
        for r in await pg.fetch(
            "EXPLAIN (ANALYZE, COSTS OFF) SELECT key, version FROM records "
            'WHERE collection = $1 AND key COLLATE "C" > $3 ORDER BY key COLLATE "C" LIMIT $2',
            c,
            11,
            "k00100",
        )
    )
    assert re.search(r"records(_p\d+)?_collection_key_idx", plan), plan
    assert "Sort" not in plan.replace("Sort Key", ""), plan
