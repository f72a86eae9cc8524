"""The layout of the ``records`` table: plain, or ``PARTITION BY HASH (collection, key)``
into N partitions (``wbcache migrate --hash-partitions N``).

The migrations choose the layout when they create the table; afterwards ``migrate`` only
reads it, under its advisory lock, and refuses a request for another one: converting a
table is an offline job (docs/scaling.md, "Past one Postgres")."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

MIN_PARTITIONS = 2
MAX_PARTITIONS = 1024
# What the service's primary key and every query on records is written against.
HASH_COLUMNS = ("collection", "key")

_LAYOUT = text(
    """
    SELECT pt.partstrat::text AS strategy,
           ARRAY(SELECT a.attname::text
                 FROM unnest(pt.partattrs::int2[]) WITH ORDINALITY AS k(attnum, i)
                 JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = k.attnum
                 ORDER BY k.i) AS columns,
           ARRAY(SELECT pg_get_expr(p.relpartbound, p.oid)
                 FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhrelid
                 WHERE i.inhparent = c.oid) AS bounds
    FROM pg_class c
    LEFT JOIN pg_partitioned_table pt ON pt.partrelid = c.oid
    WHERE c.oid = to_regclass('records')
    """
)
_HASH_BOUND = re.compile(r"FOR VALUES WITH \(modulus (\d+), remainder (\d+)\)")
_STRATEGIES = {"h": "hash", "l": "list", "r": "range"}


class LayoutMismatch(Exception):
    """``records`` exists with another layout than the one asked for; nothing changed."""


def check_count(n: int) -> int:
    if not MIN_PARTITIONS <= n <= MAX_PARTITIONS:
        raise ValueError(
            f"the number of hash partitions must be {MIN_PARTITIONS} to {MAX_PARTITIONS}, not {n}"
        )
    return n


@dataclass(frozen=True, slots=True)
class Layout:
    """How an existing ``records`` table is laid out."""

    strategy: str | None  # None: a plain table; else "hash", "list" or "range"
    columns: tuple[str, ...] = ()
    bounds: tuple[str, ...] = ()

    def hash_partitions(self) -> int | None:
        """N when the table is hash-partitioned on (collection, key) into exactly the N
        partitions of modulus N (remainders 0 … N-1), else None."""
        if self.strategy != "hash" or self.columns != HASH_COLUMNS or not self.bounds:
            return None
        n = len(self.bounds)
        found = [_HASH_BOUND.fullmatch(b) for b in self.bounds]
        pairs = sorted((int(m[1]), int(m[2])) for m in found if m)
        return n if pairs == [(n, r) for r in range(n)] else None

    def describe(self) -> str:
        if self.strategy is None:
            return "a plain table (not partitioned)"
        n = self.hash_partitions()
        if n is not None:
            return f"hash-partitioned on (collection, key) into {n} partitions"
        return (
            f"{self.strategy}-partitioned on ({', '.join(self.columns)}) "
            f"with {len(self.bounds)} partitions"
        )


def read_layout(connection: Connection) -> Layout | None:
    """The layout of ``records``, or None when there is no such table."""
    row = connection.execute(_LAYOUT).one_or_none()
    if row is None:
        return None
    if row.strategy is None:
        return Layout(None)
    return Layout(
        _STRATEGIES.get(row.strategy, row.strategy), tuple(row.columns), tuple(row.bounds)
    )


def check_layout(connection: Connection, hash_partitions: int | None) -> None:
    """Refuse (LayoutMismatch) to go on when ``records`` exists and is not laid out as
    asked; nothing to check when nothing was asked or the table is still to be created."""
    if hash_partitions is None:
        return
    layout = read_layout(connection)
    if layout is None or layout.hash_partitions() == hash_partitions:
        return
    raise LayoutMismatch(
        f"records already exists as {layout.describe()}; --hash-partitions "
        f"{hash_partitions} asks for {hash_partitions} hash partitions on (collection, key). "
        "wbcache migrate chooses the layout only when it creates the table and never "
        'converts one: see docs/scaling.md ("Past one Postgres") for the offline '
        "conversion. Nothing was changed."
    )
