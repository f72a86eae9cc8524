"""The values the record store takes and gives: a write (its operation, preconditions and
what the write script must know), its result, and a read's record."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.core import repository


class Op(StrEnum):
    PUT = "put"
    PATCH = "patch"
    DELETE = "del"


class Status(StrEnum):
    OK = "OK"
    NOT_FOUND = "NOTFOUND"
    PRECONDITION_FAILED = "PRECOND"
    CONFLICT = "CONFLICT"
    FULL = "FULL"


@dataclass(frozen=True, slots=True)
class Match:
    """An If-Match / If-None-Match condition: ``any`` for ``*``, else a set of versions."""

    any: bool = False
    versions: frozenset[int] = frozenset()

    def lua(self) -> tuple[str, str]:
        if self.any:
            return "1", ""
        return "2", "," + ",".join(str(v) for v in self.versions) + ","


@dataclass(frozen=True, slots=True)
class Preconditions:
    if_match: Match | None = None
    if_none_match: Match | None = None


@dataclass(frozen=True, slots=True)
class WriteResult:
    status: Status
    version: int = 0
    created: bool = False


@dataclass(frozen=True, slots=True)
class WriteCall:
    """One write: a put or a patch (with its canonical document) or a delete, and what
    the write script must know besides (service/core/lua/write.lua)."""

    op: Op
    collection: str
    key: str
    document: bytes = b""
    pre: Preconditions = Preconditions()  # noqa: RUF009 - frozen, immutable
    # A patch's compare-and-set: the version the merge was made on.
    expect: int | None = None
    # Postgres' row when the key is not cached (its version floor and existence); None
    # lets the script answer MISS for an uncached key.
    stored: repository.StoredRow | None = None
    # Accepted past MAX_PENDING (a write that then goes through to Postgres).
    force: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """What a read found: a document (None for a deleted/absent key) at a version."""

    version: int
    document: bytes | None
    hit: bool
    dead_lettered: bool = False


# What happened to one call of write_many / read_many: its result, or what stopped it.
WriteOutcome = WriteResult | Exception
ReadOutcome = Record | Exception
