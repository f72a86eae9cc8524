"""Surrogate keys: the names an edge files a record's answers under, so that one purge
drops a record (``r/<collection>/<key>``) or a whole collection (``c/<collection>``).

The record's key is percent-encoded (every byte outside A-Z a-z 0-9 ``-._~``): a surrogate
key holds no space or comma (the separators of ``Surrogate-Key`` and ``xkey``) and no
byte a header cannot carry, whatever the record's key holds."""

from __future__ import annotations

from urllib.parse import quote

# The purge queue's members (service/core/purge.py): the Lua write script adds
# ``RECORD + member`` itself, so the prefix is fixed here and in write.lua.
RECORD = "r:"
COLLECTION = "c:"


def collection_key(collection: str) -> str:
    return f"c/{collection}"


def record_key(collection: str, key: str) -> str:
    return f"r/{collection}/{quote(key, safe='')}"


def header(collection: str, key: str) -> str:
    """The ``Surrogate-Key`` value of a record's answers: the collection's key first."""
    return f"c/{collection} {record_key(collection, key)}"


def of_queued(queued: str) -> str:
    """The surrogate key a purge queue member names (``r:<collection>:<key>`` or
    ``c:<collection>``)."""
    if queued.startswith(RECORD):
        collection, _, key = queued[len(RECORD) :].partition(":")
        return record_key(collection, key)
    if queued.startswith(COLLECTION):
        return collection_key(queued[len(COLLECTION) :])
    raise ValueError(f"not a purge queue member: {queued!r}")


def path(surrogate_key: str) -> str:
    """The URL path a surrogate key stands for, for an edge that purges by path
    (CloudFront): ``/v1/<collection>/<key>``, or ``/v1/<collection>/*``."""
    kind, _, rest = surrogate_key.partition("/")
    if kind == "r":
        return f"/v1/{rest}"
    if kind == "c":
        return f"/v1/{rest}/*"
    raise ValueError(f"not a surrogate key: {surrogate_key!r}")
