"""What the client returns: plain, immutable values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wbcache.errors import WbcacheError


def etag_of(version: int) -> str:
    """The strong ETag the API gives a version."""
    return f'"{version}"'


@dataclass(frozen=True, slots=True)
class Record:
    """A record as read (or as a PATCH left it): its document at ``version``."""

    collection: str
    key: str
    version: int
    document: Any

    @property
    def etag(self) -> str:
        """For ``if_match`` / ``if_none_match``."""
        return etag_of(self.version)


@dataclass(frozen=True, slots=True)
class Written:
    """An accepted PUT or DELETE: the version it created (``created`` for a new key)."""

    collection: str
    key: str
    version: int
    created: bool = False

    @property
    def etag(self) -> str:
        return etag_of(self.version)


@dataclass(frozen=True, slots=True)
class Item:
    """One key of a listing; ``document`` only with ``include_documents=True``."""

    key: str
    version: int
    document: Any = None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing, keys in byte order; ``next_cursor`` is None on the last."""

    collection: str
    items: list[Item]
    next_cursor: str | None

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self.items]


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One operation's outcome in a batch: ``status`` as the single-key call would have
    answered, and ``error`` (the exception that call would have raised) when it failed."""

    status: int
    version: int | None = None
    document: Any = None
    error: WbcacheError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None
