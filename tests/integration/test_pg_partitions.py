"""``wbcache migrate --hash-partitions N``: records created ``PARTITION BY HASH
(collection, key)`` into N partitions, refused (exit 2) over another layout, a no-op over
the same one (concurrent runs included), and the service's flush and read paths on it.

Each test works in databases of its own, named after the session's test database
(``<name>_hp…``), created and dropped here. The whole suite can also run against a
partitioned table: ``pytest --pg-hash-partitions 8``."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from service.adapters.migrate import migrate
from service.config import Settings
from service.core import repository
from tests.conftest import running_api, running_worker, wait_drained
from tests.support import servers as test_servers
from tests.support.procs import wbcache_argv


def _with_database(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


async def _drop(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    assert "test" in name, name
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def fresh_db(servers: test_servers.TestServers) -> AsyncIterator[Callable[[str], str]]:
    """URLs of databases that do not exist yet (``migrate`` creates them), dropped after."""
    base = urlsplit(servers.database_url).path.lstrip("/")
    made: list[str] = []

    def make(suffix: str) -> str:
        url = _with_database(servers.database_url, f"{base}_hp{suffix}")
        made.append(url)
        return url

    yield make
    for url in made:
        await _drop(url)


@pytest.fixture(scope="module")
def partitioned_url(servers: test_servers.TestServers) -> Iterator[str]:
    """A database migrated with --hash-partitions 8 (in-process), for the service tests."""
    base = urlsplit(servers.database_url).path.lstrip("/")
    url = _with_database(servers.database_url, f"{base}_hp8svc")
    asyncio.run(_drop(url))
    layout = migrate(url, 8)
    assert layout is not None and layout.hash_partitions() == 8
    yield url
    asyncio.run(_drop(url))


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


async def wbcache_migrate(url: str, *args: str) -> Result:
    env = dict(os.environ, DATABASE_URL=url)
    proc = await asyncio.create_subprocess_exec(
        *wbcache_argv("migrate", *args),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@dataclass
class Partitions:
    strategy: str | None
    columns: list[str]
    children: dict[str, str]  # name -> bound
    oids: list[int]


async def partitions(url: str) -> Partitions | None:
    """records as the catalogs tell it (pg_partitioned_table, pg_inherits)."""
    conn = await asyncpg.connect(url)
    try:
        oid = await conn.fetchval("SELECT to_regclass('records')::oid")
        if oid is None:
            return None
        part = await conn.fetchrow(
            "SELECT partstrat::text, partattrs::int2[] AS attrs FROM pg_partitioned_table "
            "WHERE partrelid = $1",
            oid,
        )
        columns = []
        if part is not None:
            for attnum in part["attrs"]:
                columns.append(
                    await conn.fetchval(
                        "SELECT attname FROM pg_attribute WHERE attrelid = $1 AND attnum = $2",
                        oid,
                        attnum,
                    )
                )
        rows = await conn.fetch(
            "SELECT c.oid, c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound "
            "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = $1 ORDER BY c.oid",
            oid,
        )
    finally:
        await conn.close()
    return Partitions(
        part["partstrat"] if part else None,
        columns,
        {r["relname"]: r["bound"] for r in rows},
        [oid, *(r["oid"] for r in rows)],
    )


def _is_hash_8(p: Partitions | None) -> None:
    assert p is not None
    assert p.strategy == "h" and p.columns == ["collection", "key"]
    assert p.children == {
        f"records_p{i}": f"FOR VALUES WITH (modulus 8, remainder {i})" for i in range(8)
    }


async def _shape(url: str, table: str) -> dict[str, Any]:
    """Columns, constraints and indexes of a table, with its own name taken out."""
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT column_name, data_type, is_nullable, column_default, collation_name "
            "FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            table,
        )
        constraints = await conn.fetch(
            "SELECT conname, contype::text, pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = $1::regclass ORDER BY conname",
            table,
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY 1", table
        )
    finally:
        await conn.close()

    def plain(text: str) -> str:
        return re.sub(rf"\b{table}(?=\b|_)", "T", text.replace("ONLY ", ""))

    return {
        "columns": [tuple(r) for r in columns],
        "constraints": [(plain(r["conname"]), r["contype"], r["def"]) for r in constraints],
        "indexes": [(plain(r["indexname"]), plain(r["indexdef"])) for r in indexes],
    }


async def test_migrate_creates_records_hash_partitioned(
    servers: test_servers.TestServers, fresh_db: Callable[[str], str]
) -> None:
    url, plain_url = fresh_db("8"), fresh_db("plain")
    r = await wbcache_migrate(url, "--hash-partitions", "8")
    assert r.code == 0, r
    assert "hash-partitioned on (collection, key) into 8 partitions" in r.stdout, r
    _is_hash_8(await partitions(url))

    # The same columns, primary key and indexes as the plain table, on the parent and on
    # every partition; tombstones as it always is.
    assert (await wbcache_migrate(plain_url)).code == 0
    p = await partitions(plain_url)
    assert p is not None and p.strategy is None and not p.children
    plain = await _shape(plain_url, "records")
    assert plain["constraints"] == [("T_pkey", "p", "PRIMARY KEY (collection, key)")]
    assert await _shape(url, "records") == plain
    for i in range(8):
        assert await _shape(url, f"records_p{i}") == plain
    assert await _shape(url, "tombstones") == await _shape(plain_url, "tombstones")


async def test_same_layout_again_is_a_noop_also_when_run_at_once(
    fresh_db: Callable[[str], str],
) -> None:
    url = fresh_db("8again")
    runs = await asyncio.gather(*(wbcache_migrate(url, "--hash-partitions", "8") for _ in range(3)))
    assert [r.code for r in runs] == [0, 0, 0], runs
    before = await partitions(url)
    _is_hash_8(before)

    again = await wbcache_migrate(url, "--hash-partitions", "8")
    assert again.code == 0, again
    without_flag = await wbcache_migrate(url)
    assert without_flag.code == 0, without_flag
    assert "into 8 partitions" in without_flag.stdout
    assert await partitions(url) == before  # the very same tables (oids), untouched


async def test_another_layout_is_refused_with_exit_2(fresh_db: Callable[[str], str]) -> None:
    url, plain_url, by_collection = fresh_db("8refuse"), fresh_db("plainrefuse"), fresh_db("c")
    assert (await wbcache_migrate(url, "--hash-partitions", "8")).code == 0
    before = await partitions(url)
    conn = await asyncpg.connect(url)
    await conn.execute("INSERT INTO records VALUES ('c', 'k', '{}', 1, now())")  # must survive
    await conn.close()

    r = await wbcache_migrate(url, "--hash-partitions", "16")
    assert r.code == 2, r
    assert "into 8 partitions" in r.stderr and "--hash-partitions 16" in r.stderr, r
    assert "docs/scaling.md" in r.stderr and "Nothing was changed" in r.stderr, r
    assert "Traceback" not in r.stderr, r
    assert await partitions(url) == before

    # A plain table is never converted either.
    assert (await wbcache_migrate(plain_url)).code == 0
    r = await wbcache_migrate(plain_url, "--hash-partitions", "8")
    assert r.code == 2, r
    assert "a plain table (not partitioned)" in r.stderr, r
    p = await partitions(plain_url)
    assert p is not None and p.strategy is None

    # Eight hash partitions, but on another key than (collection, key): not the layout.
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    name = urlsplit(by_collection).path.lstrip("/")
    await conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    await conn.close()
    conn = await asyncpg.connect(by_collection)
    await conn.execute(
        "CREATE TABLE records (collection text, key text, value jsonb NOT NULL, "
        "version bigint NOT NULL, updated_at timestamptz NOT NULL, "
        "PRIMARY KEY (collection, key)) PARTITION BY HASH (collection)"
    )
    for i in range(8):
        await conn.execute(
            f"CREATE TABLE records_p{i} PARTITION OF records "
            f"FOR VALUES WITH (MODULUS 8, REMAINDER {i})"
        )
    await conn.close()
    r = await wbcache_migrate(by_collection, "--hash-partitions", "8")
    assert r.code == 2, r
    assert "hash-partitioned on (collection) with 8 partitions" in r.stderr, r

    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT count(*) FROM records") == 1
    await conn.close()


async def test_concurrent_runs_asking_for_different_layouts_one_wins(
    fresh_db: Callable[[str], str],
) -> None:
    url = fresh_db("race")
    runs = await asyncio.gather(
        wbcache_migrate(url, "--hash-partitions", "8"),
        wbcache_migrate(url, "--hash-partitions", "16"),
    )
    assert sorted(r.code for r in runs) == [0, 2], runs
    winner = 8 if runs[0].code == 0 else 16
    p = await partitions(url)
    assert p is not None and len(p.children) == winner
    loser = runs[1] if winner == 8 else runs[0]
    assert f"into {winner} partitions" in loser.stderr, loser


CONVERT = Path(__file__).resolve().parents[2] / "deploy/postgres/hash_partition_records.sql"


async def _convert(url: str, n: int) -> None:
    """deploy/postgres/hash_partition_records.sql, as ``psql -v partitions=N -f`` runs it."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(CONVERT.read_text().replace(":'partitions'", f"'{n}'"))
    finally:
        await conn.close()


async def test_offline_conversion_gives_the_layout_migrate_makes(
    fresh_db: Callable[[str], str],
) -> None:
    url, made = fresh_db("conv"), fresh_db("convref")
    assert (await wbcache_migrate(url)).code == 0
    assert (await wbcache_migrate(made, "--hash-partitions", "8")).code == 0
    plain_shape = await _shape(url, "records")
    conn = await asyncpg.connect(url)
    await conn.execute(
        "INSERT INTO records SELECT 'c' || (i % 7), 'k' || i, jsonb_build_object('i', i), i, "
        "now() FROM generate_series(1, 3000) i"
    )
    before = await conn.fetch("SELECT * FROM records ORDER BY collection, key")
    await conn.close()

    await _convert(url, 8)
    _is_hash_8(await partitions(url))
    assert await _shape(url, "records") == plain_shape == await _shape(made, "records")
    for i in range(8):
        assert await _shape(url, f"records_p{i}") == await _shape(made, f"records_p{i}")
    r = await wbcache_migrate(url, "--hash-partitions", "8")
    assert r.code == 0, r
    assert (await wbcache_migrate(url, "--hash-partitions", "4")).code == 2
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetch("SELECT * FROM records ORDER BY collection, key") == before
        assert await conn.fetchval("SELECT count(*) FROM records_plain") == 3000
        assert await conn.fetchval("SELECT count(DISTINCT tableoid) FROM records") == 8
    finally:
        await conn.close()

    # Run again on the partitioned table: refused, nothing changed.
    with pytest.raises(asyncpg.RaiseError, match="already partitioned"):
        await _convert(url, 8)
    _is_hash_8(await partitions(url))


@pytest.mark.parametrize("n", ["1", "0", "1025", "eight"])
async def test_partition_count_out_of_range_is_a_usage_error(
    n: str, fresh_db: Callable[[str], str], servers: test_servers.TestServers
) -> None:
    url = fresh_db("bad")
    r = await wbcache_migrate(url, "--hash-partitions", n)
    assert r.code == 2, r
    assert "--hash-partitions" in r.stderr, r
    conn = await asyncpg.connect(_with_database(servers.database_url, "postgres"))
    try:
        name = urlsplit(url).path.lstrip("/")
        assert not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()
    with pytest.raises(ValueError, match="2 to 1024"):
        migrate(url, int(n) if n.isdigit() else 1)


def _keys(i: int) -> str:
    # Keys whose bytes sort differently from most collations: case, punctuation, non-ASCII,
    # an encoded '/', which is part of the key.
    return ["k%04d", "K%04d", "é%04d", "a/b%04d", "z-%04d", "日本%04d"][i % 6] % i


async def test_flush_and_reads_on_a_partitioned_records(
    settings_factory: Callable[..., Settings], partitioned_url: str, redis: Any
) -> None:
    settings = settings_factory(database_url=partitioned_url)
    expected: dict[tuple[str, str], tuple[int, Any]] = {}
    deleted: dict[tuple[str, str], int] = {}
    async with running_api(settings) as api:
        for c in ("hpa", "hpb"):
            for i in range(150):
                k = _keys(i)
                r = await api.put(f"/v1/{c}/{quote(k, safe='')}", json={"i": i, "c": c})
                assert r.status_code == 201, r.text
                expected[(c, k)] = (r.json()["version"], {"i": i, "c": c})
        async with running_worker(settings):
            # Overwrite some, patch some, delete some, while the worker flushes.
            for c in ("hpa", "hpb"):
                for i in range(0, 150, 3):
                    k = _keys(i)
                    r = await api.put(f"/v1/{c}/{quote(k, safe='')}", json={"i": i, "again": 1})
                    assert r.status_code == 200, r.text
                    expected[(c, k)] = (r.json()["version"], {"i": i, "again": 1})
                for i in range(1, 150, 7):
                    k = _keys(i)
                    r = await api.patch(
                        f"/v1/{c}/{quote(k, safe='')}",
                        content=b'{"p": true}',
                        headers={"Content-Type": "application/merge-patch+json"},
                    )
                    assert r.status_code == 200, r.text
                    expected[(c, k)] = (int(r.headers["ETag"].strip('"')), r.json())
                for i in range(2, 150, 5):
                    k = _keys(i)
                    r = await api.delete(f"/v1/{c}/{quote(k, safe='')}")
                    assert r.status_code == 204, r.text
                    deleted[(c, k)] = int(r.headers["ETag"].strip('"'))
                    del expected[(c, k)]
            stats = await wait_drained(api, timeout=30)
            assert stats["dead_letters"] == 0

        conn = await asyncpg.connect(partitioned_url)
        try:
            rows = await conn.fetch(
                "SELECT tableoid::regclass::text AS part, collection, key, version, "
                "value::text AS value FROM records WHERE collection IN ('hpa', 'hpb')"
            )
            got = {(r["collection"], r["key"]): r for r in rows}
            assert set(got) == set(expected)
            for ck, (version, doc) in expected.items():
                assert got[ck]["version"] == version, ck
                assert json.loads(got[ck]["value"]) == doc, ck
            per_part: dict[str, int] = {}
            for r in rows:
                per_part[r["part"]] = per_part.get(r["part"], 0) + 1
            # ~250 live keys hashed over 8 partitions: every one holds some (an empty one
            # would be a 1-in-10^11 event), none holds them all.
            assert sorted(per_part) == [f"records_p{i}" for i in range(8)], per_part
            assert max(per_part.values()) < len(rows) / 2, per_part
            tomb = await conn.fetch(
                "SELECT collection, key, version FROM tombstones WHERE collection IN ('hpa', 'hpb')"
            )
            assert {(t["collection"], t["key"]): t["version"] for t in tomb} == deleted

            # A late, repeated flush of older writes changes nothing: no row moves back,
            # no deleted key comes back (the version fence, across partitions).
            old = repository.Columns()
            for (c, k), (version, _) in list(expected.items())[:40]:
                old.add(c, k, '{"stale": true}', version - 1)
            for (c, k), version in list(deleted.items())[:40]:
                old.add(c, k, '{"stale": true}', version - 1)
            await repository.persist(conn, old, repository.Columns())
            again = await conn.fetch(
                "SELECT collection, key, version FROM records WHERE collection IN ('hpa', 'hpb')"
            )
            assert {(r["collection"], r["key"]): r["version"] for r in again} == {
                ck: v for ck, (v, _) in expected.items()
            }
        finally:
            await conn.close()

        # Reads from Postgres (cache dropped): every key by its own partition.
        for c in ("hpa", "hpb"):
            r = await api.post("/v1/invalidate", json={"collection": c})
            assert r.status_code == 200, r.text
        for (c, k), (version, doc) in expected.items():
            r = await api.get(f"/v1/{c}/{quote(k, safe='')}")
            assert r.status_code == 200, (c, k, r.text)
            assert r.headers["X-Cache"] == "miss"
            assert r.headers["ETag"] == f'"{version}"'
            assert r.json() == doc
        for c, k in deleted:
            r = await api.get(f"/v1/{c}/{quote(k, safe='')}")
            assert r.status_code == 404, (c, k, r.text)


async def test_keyset_listing_across_partitions_is_in_byte_order(partitioned_url: str) -> None:
    """A collection's keys are spread over every partition; a listing by prefix in byte
    order with a keyset cursor (the query shape of ``GET /v1/{collection}?prefix=``)
    merges them back into one order. main has no listing endpoint yet: run its tests with
    ``--pg-hash-partitions`` once it has."""
    keys = [_keys(i) for i in range(600)] + ["k", "k\u00ff", "k\U0001f600", "K", "k0000x"]
    conn = await asyncpg.connect(partitioned_url)
    try:
        await conn.execute("DELETE FROM records WHERE collection = 'hplist'")
        await conn.execute(
            "INSERT INTO records SELECT 'hplist', k, '{}', 1, now() FROM unnest($1::text[]) k",
            keys,
        )
        spread = await conn.fetchval(
            "SELECT count(DISTINCT tableoid) FROM records WHERE collection = 'hplist'"
        )
        assert spread == 8
        page_sql = """
            SELECT key FROM records
            WHERE collection = $1 AND starts_with(key, $2) AND key COLLATE "C" > $3
            ORDER BY key COLLATE "C" LIMIT $4
        """
        for prefix in ("", "k", "é", "日本"):
            want = sorted((k for k in keys if k.startswith(prefix)), key=lambda s: s.encode())
            got: list[str] = []
            cursor = ""
            while True:
                page = [r["key"] for r in await conn.fetch(page_sql, "hplist", prefix, cursor, 37)]
                got += page
                if len(page) < 37:
                    break
                cursor = page[-1]
            assert got == want, prefix
    finally:
        await conn.execute("DELETE FROM records WHERE collection = 'hplist'")
        await conn.close()
