"""Listing a collection (GET /v1/{collection}): its keys in byte order, a page at a time,
as the write-behind queue makes them, not only as Postgres holds them.

A key's truth is its Redis entry while a write to it is not yet persisted, and Postgres'
row once it is. The entries that may differ from Postgres are those of the shard's
pending keys (``Keys.pending_keys``: dirty, in flight or dead-lettered), indexed in byte
order. So a page merges two keyset scans over the same range: the pending keys of the
collection (ZRANGEBYLEX, per shard), read first, with their entries; then Postgres' rows.
An entry overrides its key's row (a pending delete hides it, a pending write adds or
replaces it); an entry gone meanwhile leaves the row to answer.

Redis before Postgres is what makes a key that exists throughout never missing: a key
pending when Redis is read is answered by its entry; one that is not was released after
its commit, so Postgres, read after, holds it. Pages follow each other by key (the
cursor is the last key listed), so no key is listed twice, and one that exists
throughout is on the page whose range holds it.

Cost per page of n keys: Redis reads at most n + 1 pending keys of the collection per
shard, and their entries; Postgres reads n + 1 rows plus one per pending delete in range,
through the index records_collection_key_idx. A range whose pending keys outnumber the page is
walked in slices (each slice ends where one shard's read ended), never past what it
lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.adapters.postgres import PgPool
from service.adapters.redis import AnyRedis
from service.core import documents, repository
from service.core.errors import classify
from service.core.redis_keys import member
from service.core.repository import KeyRange
from service.core.shards import Shards

# No byte of UTF-8 text is 0xFF: every key that starts with a prefix sorts below
# prefix + b"\xff".
_AFTER_TEXT = b"\xff"


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    version: int
    document: bytes | None  # canonical JSON, when asked for


@dataclass(frozen=True, slots=True)
class Listing:
    items: list[Listed]
    more: bool  # a key follows the last item


@dataclass(frozen=True, slots=True)
class _Pending:
    """A pending key's entry: its version, and its document or None if deleted."""

    version: int
    deleted: bool
    document: bytes | None


def prefix_end(prefix: str) -> str | None:
    """The first string above every string that starts with ``prefix`` (in code point
    order, which is UTF-8 byte order), or None when there is none."""
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:  # surrogates are not text
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None


class Lister:
    def __init__(self, redis: AnyRedis, pg: PgPool, shards: Shards) -> None:
        self.redis = redis
        self.pg = pg
        self.shards = shards

    async def page(
        self,
        collection: str,
        prefix: str = "",
        after: str | None = None,
        limit: int = 100,
        include_documents: bool = False,
    ) -> Listing:
        """The first ``limit`` keys of ``collection`` that start with ``prefix`` and sort
        after ``after`` (a previous page's last key)."""
        want = limit + 1  # one more tells whether another page follows
        if after is not None and after >= prefix:
            low, inclusive = after, False
        else:
            low, inclusive = prefix, True
        below = prefix_end(prefix) if prefix else None
        found: list[Listed] = []
        while len(found) < want:
            keys = KeyRange(low, inclusive, below)
            slice_, end = await self._slice(collection, prefix, keys, want, include_documents)
            found += slice_
            if end is None:
                break
            low, inclusive = end, False
        return Listing(found[:limit], len(found) > limit)

    async def _slice(
        self, collection: str, prefix: str, keys: KeyRange, want: int, documents_too: bool
    ) -> tuple[list[Listed], str | None]:
        """The keys of ``keys`` up to where both sources are known complete, and that
        end (None: the range is done)."""
        pending, through = await self._pending(collection, prefix, keys, want, documents_too)
        hidden = sum(1 for p in pending.values() if p.deleted)
        limit = want + hidden  # each pending delete hides at most one row
        rows = await self._rows(
            collection,
            KeyRange(keys.low, keys.low_inclusive, keys.below, through),
            limit,
            documents_too,
        )
        end = through
        if len(rows) == limit and (end is None or rows[-1].key < end):
            end = rows[-1].key  # Postgres has more beyond its last row
        merged: dict[str, Listed] = {}
        for row in rows:
            if row.key not in pending and (end is None or row.key <= end):
                doc = documents.from_postgres(row.value) if row.value is not None else None
                merged[row.key] = Listed(row.key, row.version, doc)
        for key, p in pending.items():
            if not p.deleted and (end is None or key <= end):
                merged[key] = Listed(key, p.version, p.document)
        return [merged[k] for k in sorted(merged)], end

    async def _pending(
        self, collection: str, prefix: str, keys: KeyRange, want: int, documents_too: bool
    ) -> tuple[dict[str, _Pending], str | None]:
        """The entries of the collection's pending keys in ``keys``, at most ``want`` per
        shard, and the last key up to which they are all known (None: all of them)."""
        name = member(collection, "").encode()  # b"collection:"
        low = (b"[" if keys.low_inclusive else b"(") + name + keys.low.encode()
        high = b"(" + name + prefix.encode() + _AFTER_TEXT
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in self.shards:
                pipe.zrangebylex(k.pending_keys, low, high, 0, want)
            per_shard: list[list[bytes]] = await pipe.execute()
        through: str | None = None
        for members in per_shard:
            if len(members) == want:  # this shard has more past its last: known to there
                last = members[-1][len(name) :].decode()
                through = last if through is None or last < through else through
        names = sorted({m[len(name) :].decode() for members in per_shard for m in members})
        names = [n for n in names if (through is None or n <= through)]
        if not names:
            return {}, through
        fields = ["v", "t", "d"] if documents_too else ["v", "t"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in names:
                pipe.hmget(self.shards.for_record(collection, key).entry(collection, key), fields)
            entries: list[list[Any]] = await pipe.execute()
        pending: dict[str, _Pending] = {}
        for key, entry in zip(names, entries, strict=True):
            if entry[0] is None:
                continue  # released and gone since: Postgres answers
            deleted = entry[1] == b"1"
            doc = entry[2] if documents_too and not deleted else None
            pending[key] = _Pending(int(entry[0]), deleted, doc)
        return pending, through

    async def _rows(
        self, collection: str, keys: KeyRange, limit: int, values: bool
    ) -> list[repository.ListedRow]:
        try:
            pool = await self.pg.get()
            return await repository.list_rows(pool, collection, keys, limit, values)
        except Exception as exc:
            unavailable = classify(exc, talking_to="postgres")
            if unavailable is None:
                raise
            raise unavailable from exc
