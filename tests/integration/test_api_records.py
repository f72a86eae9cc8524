"""The records API of CONTRACT.md row by row (PUT, PATCH, GET/HEAD, DELETE) and the write
modes, against the real Redis and Postgres: versions, ETags, Cache-Control, X-Cache,
canonical bytes, merge patches, and what Postgres holds when a response arrives."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from arq.worker import Worker

from service.config import Settings
from service.core.shards import Shards
from tests.conftest import running_api, running_worker, wait_drained

if TYPE_CHECKING:  # a class named Test* must not be collected as a test class
    from tests.support.servers import TestServers


MERGE = {"Content-Type": "application/merge-patch+json"}
THROUGH = {"Write-Mode": "through"}
# A Postgres nobody answers on: port 1 is closed.
DOWN_URL = "postgresql://postgres@127.0.0.1:1/x"


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
    return Shards.from_settings(settings).for_record(collection, key).entry(collection, key)


async def evict(redis: Any, settings: Settings, collection: str, key: str) -> None:
    """Simulate Redis evicting a clean cache entry."""
    assert await redis.delete(entry_key(settings, collection, key)) == 1


async def pg_row(pg: asyncpg.Connection, collection: str, key: str) -> tuple[Any, int] | None:
    row = await pg.fetchrow(
        "SELECT value::text AS value, version FROM records WHERE collection = $1 AND key = $2",
        collection,
        key,
    )
    if row is None:
        return None
    return json.loads(row["value"]), int(row["version"])


def version_of(r: httpx.Response) -> int:
    tag = r.headers["etag"]
    assert tag.startswith('"') and tag.endswith('"'), tag
    return int(tag[1:-1])


def assert_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["code"], str) and body["error"]["code"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def pending(api: httpx.AsyncClient) -> int:
    n: int = (await api.get("/v1/stats")).json()["pending"]
    return n


# -- PUT ------------------------------------------------------------------------------------


async def test_put_creates_201_then_replaces_200(api: httpx.AsyncClient, c: str) -> None:
    r = await api.put(f"/v1/{c}/alice", json={"name": "Alice"})
    assert r.status_code == 201
    body = r.json()
    assert set(body) == {"collection", "key", "version"}
    assert body["collection"] == c and body["key"] == "alice"
    v1 = body["version"]
    assert isinstance(v1, int) and v1 > 0
    assert r.headers["etag"] == f'"{v1}"'

    r = await api.put(f"/v1/{c}/alice", json={"name": "Alice B."})
    assert r.status_code == 200
    assert r.json() == {"collection": c, "key": "alice", "version": version_of(r)}
    assert version_of(r) > v1

    got = await api.get(f"/v1/{c}/alice")
    assert got.json() == {"name": "Alice B."}
    assert version_of(got) == version_of(r)


async def test_put_after_delete_creates_again(api: httpx.AsyncClient, c: str) -> None:
    await api.put(f"/v1/{c}/k", json=1)
    assert (await api.delete(f"/v1/{c}/k")).status_code == 204
    r = await api.put(f"/v1/{c}/k", json=2)
    assert r.status_code == 201


async def test_version_grows_on_every_write(api: httpx.AsyncClient, c: str) -> None:
    versions = [version_of(await api.put(f"/v1/{c}/k", json={"a": 1}))]
    versions.append(version_of(await api.put(f"/v1/{c}/k", json={"a": 1})))  # same document
    versions.append(version_of(await api.patch(f"/v1/{c}/k", content=b'{"b":2}', headers=MERGE)))
    versions.append(version_of(await api.patch(f"/v1/{c}/k", content=b"{}", headers=MERGE)))
    assert (await api.delete(f"/v1/{c}/k")).status_code == 204
    versions.append(version_of(await api.put(f"/v1/{c}/k", json={"a": 1})))
    assert versions == sorted(set(versions)), versions


async def test_version_stays_above_postgres_after_eviction(
    api: httpx.AsyncClient,
    worker: Worker,
    pg: asyncpg.Connection,
    redis: Any,
    settings: Settings,
    c: str,
) -> None:
    """The cache entry is evicted and Postgres holds a version far above Redis' clock (another
    API on a Redis whose clock ran ahead): every kind of write must still go above it, or
    the guarded upsert would silently drop it."""
    v = version_of(await api.put(f"/v1/{c}/k", json={"n": 1}))
    await wait_drained(api)
    assert await pg_row(pg, c, "k") == ({"n": 1}, v)

    async def ahead() -> int:
        await wait_drained(api)
        await evict(redis, settings, c, "k")
        high = int(time.time() * 1_000_000) + 10**12  # about 11 days ahead, in µs
        await pg.execute(
            "UPDATE records SET version = $1 WHERE collection = $2 AND key = 'k'", high, c
        )
        return high

    high = await ahead()
    r = await api.put(f"/v1/{c}/k", json={"n": 2})
    assert r.status_code == 200
    assert version_of(r) > high
    await wait_drained(api)
    assert await pg_row(pg, c, "k") == ({"n": 2}, version_of(r))

    high = await ahead()
    r = await api.patch(f"/v1/{c}/k", content=b'{"m":3}', headers=MERGE)
    assert r.status_code == 200
    assert r.json() == {"n": 2, "m": 3}
    assert version_of(r) > high
    await wait_drained(api)
    assert await pg_row(pg, c, "k") == ({"n": 2, "m": 3}, version_of(r))

    high = await ahead()
    assert (await api.delete(f"/v1/{c}/k")).status_code == 204
    await wait_drained(api)
    # The delete went above the row's version, so the guarded delete removed the row.
    assert await pg_row(pg, c, "k") is None

    # The tombstone entry is evicted too: a new PUT still lands above the delete.
    await evict(redis, settings, c, "k")
    r = await api.put(f"/v1/{c}/k", json={"n": 4})
    assert r.status_code == 201
    assert version_of(r) > high
    await wait_drained(api)
    assert await pg_row(pg, c, "k") == ({"n": 4}, version_of(r))


async def test_put_above_a_row_written_by_another_program(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection, c: str
) -> None:
    high = int(time.time() * 1_000_000) + 10**12
    await pg.execute(
        "INSERT INTO records (collection, key, value, version, updated_at) "
        "VALUES ($2, 'k', '{\"x\": 1}', $1, now())",
        high,
        c,
    )
    got = await api.get(f"/v1/{c}/k")
    assert got.status_code == 200 and got.json() == {"x": 1}
    assert version_of(got) == high
    r = await api.put(f"/v1/{c}/k", json={"x": 2})
    assert r.status_code == 200
    assert version_of(r) > high
    await wait_drained(api)
    assert await pg_row(pg, c, "k") == ({"x": 2}, version_of(r))


# -- PATCH ----------------------------------------------------------------------------------


async def test_patch_is_an_rfc7396_merge_patch(api: httpx.AsyncClient, c: str) -> None:
    base = {"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "keep": "x"}
    put = await api.put(f"/v1/{c}/k", json=base)
    patch = {"a": None, "b": {"c": None, "x": {"y": 4}}, "e": [3], "f": {"g": None}, "n": None}
    r = await api.patch(f"/v1/{c}/k", content=json.dumps(patch), headers=MERGE)
    assert r.status_code == 200
    merged = {"b": {"d": 3, "x": {"y": 4}}, "e": [3], "f": {}, "keep": "x"}
    assert r.json() == merged
    assert version_of(r) > version_of(put)
    got = await api.get(f"/v1/{c}/k")
    assert got.json() == merged
    assert got.headers["etag"] == r.headers["etag"]
    assert got.content == r.content  # one canonical serialization


async def test_patch_with_a_non_object_replaces_the_document(
    api: httpx.AsyncClient, c: str
) -> None:
    await api.put(f"/v1/{c}/k", json={"a": 1})
    for patch, expected in [
        (b"[1, 2]", [1, 2]),
        (b'{"a": {"b": 1}}', {"a": {"b": 1}}),  # an object patch over an array: a new object
        (b'"text"', "text"),
        (b"42", 42),
        (b"null", None),
    ]:
        r = await api.patch(f"/v1/{c}/k", content=patch, headers=MERGE)
        assert r.status_code == 200, r.text
        assert r.json() == expected
        got = await api.get(f"/v1/{c}/k")
        assert got.status_code == 200
        assert got.json() == expected


async def test_patch_of_absent_or_deleted_key_is_404(api: httpx.AsyncClient, c: str) -> None:
    assert_error(await api.patch(f"/v1/{c}/absent", content=b'{"a":1}', headers=MERGE), 404)
    await api.put(f"/v1/{c}/k", json={"a": 1})
    await api.delete(f"/v1/{c}/k")
    assert_error(await api.patch(f"/v1/{c}/k", content=b'{"a":1}', headers=MERGE), 404)
    assert (await api.get(f"/v1/{c}/k")).status_code == 404  # the 404 created nothing
    assert (await api.get(f"/v1/{c}/absent")).status_code == 404


async def test_patch_with_wrong_content_type_is_415_with_accept_patch(
    api: httpx.AsyncClient, c: str
) -> None:
    await api.put(f"/v1/{c}/k", json={"a": 1})
    for ctype in ["application/json", "text/plain", None]:
        headers = {"Content-Type": ctype} if ctype else {}
        r = await api.patch(f"/v1/{c}/k", content=b'{"a":2}', headers=headers)
        assert_error(r, 415)
        assert "application/merge-patch+json" in r.headers["accept-patch"]
    assert (await api.get(f"/v1/{c}/k")).json() == {"a": 1}


async def test_concurrent_patches_of_different_fields_lose_none(
    api: httpx.AsyncClient, c: str
) -> None:
    await api.put(f"/v1/{c}/k", json={"base": True})
    rs = await asyncio.gather(
        *(
            api.patch(f"/v1/{c}/k", content=json.dumps({f"f{i}": i}), headers=MERGE)
            for i in range(20)
        )
    )
    assert [r.status_code for r in rs] == [200] * 20
    assert len({version_of(r) for r in rs}) == 20
    got = (await api.get(f"/v1/{c}/k")).json()
    assert got == {"base": True, **{f"f{i}": i for i in range(20)}}


async def test_concurrent_patches_of_an_uncached_key_lose_none(
    api: httpx.AsyncClient,
    worker: Worker,
    pg: asyncpg.Connection,
    redis: Any,
    settings: Settings,
    c: str,
) -> None:
    await api.put(f"/v1/{c}/k", json={"base": True})
    await wait_drained(api)
    await evict(redis, settings, c, "k")
    rs = await asyncio.gather(
        *(
            api.patch(f"/v1/{c}/k", content=json.dumps({f"f{i}": i}), headers=MERGE)
            for i in range(20)
        )
    )
    assert [r.status_code for r in rs] == [200] * 20
    expected = {"base": True, **{f"f{i}": i for i in range(20)}}
    assert (await api.get(f"/v1/{c}/k")).json() == expected
    await wait_drained(api)
    row = await pg_row(pg, c, "k")
    assert row is not None and row[0] == expected


# -- GET / HEAD -----------------------------------------------------------------------------


async def test_get_and_head_headers(api: httpx.AsyncClient, c: str) -> None:
    put = await api.put(f"/v1/{c}/k", json={"a": [1, 2]})
    r = await api.get(f"/v1/{c}/k")
    assert r.status_code == 200
    assert r.json() == {"a": [1, 2]}
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["etag"] == put.headers["etag"]
    assert r.headers["cache-control"] == "private, no-cache"
    assert r.headers["x-cache"] == "hit"
    h = await api.head(f"/v1/{c}/k")
    assert h.status_code == 200
    for name in ("etag", "cache-control", "x-cache", "content-type", "content-length"):
        assert h.headers[name] == r.headers[name], name


async def test_cache_control_max_age_per_collection(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    products, orders = f"{c}-products", f"{c}-orders"
    settings = settings_factory(collection_max_age={products: 60})
    async with running_api(settings) as api:
        await api.put(f"/v1/{products}/p1", json={"price": 3})
        await api.put(f"/v1/{orders}/o1", json={"total": 3})
        r = await api.get(f"/v1/{products}/p1")
        assert r.headers["cache-control"] == "private, max-age=60"
        assert (await api.head(f"/v1/{products}/p1")).headers["cache-control"] == (
            "private, max-age=60"
        )
        assert (await api.get(f"/v1/{orders}/o1")).headers["cache-control"] == "private, no-cache"


async def test_miss_fills_then_hits(
    api: httpx.AsyncClient, worker: Worker, redis: Any, settings: Settings, c: str
) -> None:
    put = await api.put(f"/v1/{c}/k", json={"a": 1})
    assert (await api.get(f"/v1/{c}/k")).headers["x-cache"] == "hit"
    await wait_drained(api)
    await evict(redis, settings, c, "k")
    miss = await api.get(f"/v1/{c}/k")
    assert miss.status_code == 200
    assert miss.headers["x-cache"] == "miss"
    assert miss.json() == {"a": 1}
    assert miss.headers["etag"] == put.headers["etag"]
    assert await redis.exists(entry_key(settings, c, "k")) == 1  # the miss filled
    hit = await api.get(f"/v1/{c}/k")
    assert hit.headers["x-cache"] == "hit"
    assert hit.content == miss.content


async def test_hit_and_miss_serve_identical_bytes_and_etag(
    api: httpx.AsyncClient, worker: Worker, redis: Any, settings: Settings, c: str
) -> None:
    """Postgres' jsonb reorders keys and rewrites numbers: the miss must still answer the
    bytes the hit answered."""
    await _hit_and_miss_agree(
        api,
        redis,
        settings,
        c,
        '{"b":1,"a":[1.5,1e20,{"z":null,"y":"é"}],"e":"\\u00e9\\n\\ud83d\\ude00"}',
    )


async def test_hit_and_miss_agree_on_numbers_jsonb_rewrites(
    api: httpx.AsyncClient, worker: Worker, redis: Any, settings: Settings, c: str
) -> None:
    """jsonb prints 1e16..1e19 as integers and has no negative zero."""
    await _hit_and_miss_agree(
        api, redis, settings, c, '{"n":[1.0,0.1e1,2.50,1e-7,1e15,1e16,1.5e17,1e19,-0.0,-1e19]}'
    )


async def _hit_and_miss_agree(
    api: httpx.AsyncClient, redis: Any, settings: Settings, c: str, body: str
) -> None:
    put = await api.put(
        f"/v1/{c}/k", content=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert put.status_code == 201
    hit = await api.get(f"/v1/{c}/k")
    assert hit.headers["x-cache"] == "hit"
    assert hit.json() == json.loads(body)
    await wait_drained(api)
    await evict(redis, settings, c, "k")
    miss = await api.get(f"/v1/{c}/k")
    assert miss.headers["x-cache"] == "miss"
    assert miss.content == hit.content
    assert miss.headers["etag"] == hit.headers["etag"] == put.headers["etag"]
    again = await api.get(f"/v1/{c}/k")
    assert again.headers["x-cache"] == "hit"
    assert again.content == hit.content


async def test_get_absent_and_deleted_is_404(
    api: httpx.AsyncClient, worker: Worker, redis: Any, settings: Settings, c: str
) -> None:
    assert_error(await api.get(f"/v1/{c}/absent"), 404)
    assert (await api.head(f"/v1/{c}/absent")).status_code == 404
    await api.put(f"/v1/{c}/k", json={"a": 1})
    assert (await api.delete(f"/v1/{c}/k")).status_code == 204
    assert_error(await api.get(f"/v1/{c}/k"), 404)
    assert (await api.head(f"/v1/{c}/k")).status_code == 404
    await wait_drained(api)
    await evict(redis, settings, c, "k")  # the tombstone is gone: Postgres answers
    assert_error(await api.get(f"/v1/{c}/k"), 404)
    assert_error(await api.get(f"/v1/{c}/k"), 404)


# -- DELETE ---------------------------------------------------------------------------------


async def test_delete_204_then_404(api: httpx.AsyncClient, c: str) -> None:
    await api.put(f"/v1/{c}/k", json={"a": 1})
    r = await api.delete(f"/v1/{c}/k")
    assert r.status_code == 204
    assert r.content == b""
    assert_error(await api.delete(f"/v1/{c}/k"), 404)
    assert_error(await api.delete(f"/v1/{c}/never"), 404)
    assert_error(await api.get(f"/v1/{c}/k"), 404)


async def test_delete_of_uncached_key_is_persisted(
    api: httpx.AsyncClient,
    worker: Worker,
    pg: asyncpg.Connection,
    redis: Any,
    settings: Settings,
    c: str,
) -> None:
    await api.put(f"/v1/{c}/k", json={"a": 1})
    await wait_drained(api)
    await evict(redis, settings, c, "k")
    assert (await api.delete(f"/v1/{c}/k")).status_code == 204
    assert_error(await api.get(f"/v1/{c}/k"), 404)
    await wait_drained(api)
    assert await pg_row(pg, c, "k") is None
    await evict(redis, settings, c, "k")
    assert_error(await api.delete(f"/v1/{c}/k"), 404)


# -- write modes ----------------------------------------------------------------------------


async def test_write_behind_answers_before_postgres_has_the_row(
    api: httpx.AsyncClient, pg: asyncpg.Connection, c: str
) -> None:
    r = await api.put(f"/v1/{c}/k", json={"a": 1})  # no worker runs in this test
    assert r.status_code == 201
    assert await pg_row(pg, c, "k") is None
    assert await pending(api) == 1
    assert (await api.get(f"/v1/{c}/k")).json() == {"a": 1}  # read your writes


async def test_write_through_commits_before_answering(
    api: httpx.AsyncClient, pg: asyncpg.Connection, c: str
) -> None:
    # No worker: only the request itself can have committed these.
    r = await api.put(f"/v1/{c}/k", json={"a": 1}, headers=THROUGH)
    assert r.status_code == 201
    assert await pg_row(pg, c, "k") == ({"a": 1}, version_of(r))

    r = await api.patch(f"/v1/{c}/k", content=b'{"b":2}', headers={**MERGE, **THROUGH})
    assert r.status_code == 200
    assert await pg_row(pg, c, "k") == ({"a": 1, "b": 2}, version_of(r))

    r = await api.put(f"/v1/{c}/k", json={"c": 3}, headers={"Write-Mode": "Through"})
    assert r.status_code == 200
    assert await pg_row(pg, c, "k") == ({"c": 3}, version_of(r))

    assert (await api.delete(f"/v1/{c}/k", headers=THROUGH)).status_code == 204
    assert await pg_row(pg, c, "k") is None
    assert await pending(api) == 0


async def test_write_through_after_pending_behind_writes(
    api: httpx.AsyncClient, pg: asyncpg.Connection, c: str
) -> None:
    await api.put(f"/v1/{c}/k", json={"a": 1})
    await api.put(f"/v1/{c}/k", json={"a": 2})
    r = await api.put(f"/v1/{c}/k", json={"a": 3}, headers=THROUGH)
    assert r.status_code == 200
    assert await pg_row(pg, c, "k") == ({"a": 3}, version_of(r))
    assert await pending(api) == 0


async def test_per_collection_write_mode(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any, c: str
) -> None:
    orders, carts = f"{c}-orders", f"{c}-carts"
    settings = settings_factory(collection_write_mode={orders: "through"})
    async with running_api(settings) as api:
        r = await api.put(f"/v1/{orders}/o1", json={"total": 5})
        assert r.status_code == 201
        assert await pg_row(pg, orders, "o1") == ({"total": 5}, version_of(r))

        r = await api.put(f"/v1/{carts}/c1", json={"items": 1})
        assert r.status_code == 201
        assert await pg_row(pg, carts, "c1") is None

        # The request header overrides the collection's default.
        r = await api.put(f"/v1/{orders}/o2", json={"total": 6}, headers={"Write-Mode": "behind"})
        assert r.status_code == 201
        assert await pg_row(pg, orders, "o2") is None
        assert await pending(api) == 2


async def test_write_through_with_postgres_down_is_503_and_stays_queued(
    api: httpx.AsyncClient,
    settings: Settings,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    c: str,
) -> None:
    down = settings_factory(database_url=DOWN_URL, write_through_timeout=1.0)
    async with running_api(down) as down_api:
        t0 = time.monotonic()
        r = await down_api.put(f"/v1/{c}/k", json={"a": 1}, headers=THROUGH)
        elapsed = time.monotonic() - t0
        err = assert_error(r, 503)
        assert "queued" in err["message"].lower()
        assert r.headers.get("retry-after")
        assert 0.8 <= elapsed < 4.0, elapsed
        assert await pending(down_api) == 1
        # The write is accepted: readable from Redis although Postgres is down.
        got = await down_api.get(f"/v1/{c}/k")
        assert got.status_code == 200 and got.json() == {"a": 1}

        t0 = time.monotonic()
        r = await down_api.put(f"/v1/{c}/k", json={"a": 2}, headers=THROUGH)
        assert_error(r, 503)
        assert time.monotonic() - t0 < 4.0
        assert await pending(down_api) == 1  # one key

        # A blind write-behind PUT to an uncached key needs no Postgres.
        r = await down_api.put(f"/v1/{c}/other", json={"b": 1})
        assert r.status_code == 201
        assert await pending(down_api) == 2

        ready = await down_api.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["postgres"].startswith("down")

    # Postgres is back (a worker with the real URL): the queued writes are persisted.
    assert await pg_row(pg, c, "k") is None
    async with running_worker(settings):
        await wait_drained(api)
    row = await pg_row(pg, c, "k")
    assert row is not None and row[0] == {"a": 2}
    assert (await api.get(f"/v1/{c}/k")).headers["etag"] == f'"{row[1]}"'
    assert await pg_row(pg, c, "other") is not None
