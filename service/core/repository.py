"""Postgres: the only SQL of the service, used by the API (reads) and the worker (flushes).

``records`` holds live rows; ``tombstones`` remembers the version of every delete, so a
late or repeated flush of an older write cannot bring a deleted key back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

_FETCH = """
SELECT r.value::text AS value, r.version AS version, t.version AS deleted
FROM (SELECT $1::text AS collection, $2::text AS key) AS q
LEFT JOIN records r ON r.collection = q.collection AND r.key = q.key
LEFT JOIN tombstones t ON t.collection = q.collection AND t.key = q.key
"""

# One statement for all upserts of a batch: a row only moves to a newer version, and never
# to one at or below the key's last delete.
_UPSERT = """
INSERT INTO records (collection, key, value, version, updated_at)
SELECT u.collection, u.key, u.value::jsonb, u.version, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
     AS u(collection, key, value, version)
WHERE NOT EXISTS (
    SELECT 1 FROM tombstones t
    WHERE t.collection = u.collection AND t.key = u.key AND t.version >= u.version
)
ON CONFLICT (collection, key) DO UPDATE
SET value = excluded.value, version = excluded.version, updated_at = excluded.updated_at
WHERE records.version < excluded.version
"""

# One statement for all deletes: remember the delete's version, then remove older rows.
_DELETE = """
WITH d AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[]) AS d(collection, key, version)
), remembered AS (
    INSERT INTO tombstones (collection, key, version, deleted_at)
    SELECT collection, key, version, now() FROM d
    ON CONFLICT (collection, key) DO UPDATE
    SET version = excluded.version, deleted_at = excluded.deleted_at
    WHERE tombstones.version < excluded.version
)
DELETE FROM records r USING d
WHERE r.collection = d.collection AND r.key = d.key AND r.version < d.version
"""

# Every key Postgres holds a row or a tombstone for (the key filter's build).
_ALL_KEYS = """
SELECT collection, key FROM records
UNION ALL
SELECT collection, key FROM tombstones
"""

# A page of one collection's rows in byte order (COLLATE "C": the database's own collation
# may sort 'B' after 'a'), served by the index records_collection_key_idx (migration 0002) whatever
# the database's collation: an index range scan that stops after the page. Keyset bounds
# only (no OFFSET): each condition is in the statement only when the page needs it.
_PAGE_SELECT = "SELECT key, version{value} FROM records WHERE collection = $1"
_PAGE_ORDER = ' ORDER BY key COLLATE "C" LIMIT $2'

_GC_TOMBSTONES = """
DELETE FROM tombstones WHERE deleted_at < now() - make_interval(days => $1::int)
"""


@dataclass(frozen=True, slots=True)
class StoredRow:
    """What Postgres knows of a key: its document text if live, and the highest version
    it has seen for it (row or delete)."""

    value: str | None
    version: int


@dataclass(slots=True)
class Columns:
    """One batch's operations of one kind as the columns ``unnest`` takes: built row by
    row without an object per row (the flush path's CPU is per row)."""

    collections: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    values: list[str | None] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)

    def add(self, collection: str, key: str, value: str | None, version: int) -> None:
        self.collections.append(collection)
        self.keys.append(key)
        self.values.append(value)
        self.versions.append(version)

    def __len__(self) -> int:
        return len(self.keys)


async def fetch(pool: asyncpg.Pool, collection: str, key: str) -> StoredRow:
    row = await pool.fetchrow(_FETCH, collection, key)
    assert row is not None
    version = max(row["version"] or 0, row["deleted"] or 0)
    return StoredRow(value=row["value"], version=version)


async def persist(conn: asyncpg.Connection, upserts: Columns, deletes: Columns) -> None:
    """Apply one coalesced batch (at most one operation per key) atomically: one statement
    when the batch holds one kind (no BEGIN/COMMIT round trips), else one transaction."""
    statements: list[tuple[str, tuple[list[Any], ...]]] = []
    if upserts:
        statements.append(
            (_UPSERT, (upserts.collections, upserts.keys, upserts.values, upserts.versions))
        )
    if deletes:
        statements.append((_DELETE, (deletes.collections, deletes.keys, deletes.versions)))
    if len(statements) == 1:
        await conn.execute(statements[0][0], *statements[0][1])
        return
    async with conn.transaction():
        for sql, args in statements:
            await conn.execute(sql, *args)


async def ping(pool: asyncpg.Pool) -> None:
    await pool.fetchval("SELECT 1")


async def all_keys(pool: asyncpg.Pool, batch: int = 10_000) -> AsyncIterator[list[str]]:
    """The member (``collection:key``) of every row and tombstone, ``batch`` at a time,
    read through a cursor in one transaction (one snapshot)."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        cursor = await conn.cursor(_ALL_KEYS)
        while rows := await cursor.fetch(batch):
            yield [f"{r['collection']}:{r['key']}" for r in rows]


@dataclass(frozen=True, slots=True)
class KeyRange:
    """Keys in byte order: above ``low`` (``low_inclusive``: at or above), below ``below``
    (exclusive) and at most ``through`` (inclusive); a None bound is no bound."""

    low: str = ""
    low_inclusive: bool = True
    below: str | None = None
    through: str | None = None


@dataclass(frozen=True, slots=True)
class ListedRow:
    key: str
    version: int
    value: str | None  # the jsonb as text, when asked for


async def list_rows(
    pool: asyncpg.Pool, collection: str, keys: KeyRange, limit: int, values: bool
) -> list[ListedRow]:
    """The first ``limit`` rows of ``collection`` in ``keys``, in byte order of the key."""
    sql = _PAGE_SELECT.format(value=", value::text AS value" if values else "")
    args: list[Any] = [collection, limit]
    for op, bound in (
        (">=" if keys.low_inclusive else ">", keys.low),
        ("<", keys.below),
        ("<=", keys.through),
    ):
        if bound is not None:
            args.append(bound)
            sql += f' AND key COLLATE "C" {op} ${len(args)}'
    rows = await pool.fetch(sql + _PAGE_ORDER, *args)
    return [ListedRow(r["key"], r["version"], r["value"] if values else None) for r in rows]


async def gc_tombstones(pool: asyncpg.Pool, retention_days: int) -> int:
    status = await pool.execute(_GC_TOMBSTONES, retention_days)
    return int(status.split()[-1])
