"""The Python client of wbcache: ``from wbcache import Client, AsyncClient``.

with Client("http://127.0.0.1:8000") as db:
    db.put("users", "alice", {"name": "Alice"})
    record = db.get("users", "alice")
    db.patch("users", "alice", {"age": 31}, if_match=record.etag)
"""

from wbcache._retry import Retries
from wbcache.async_client import AsyncClient
from wbcache.client import Client
from wbcache.errors import (
    BadRequest,
    Forbidden,
    Invalid,
    NotFound,
    NotPersisted,
    PreconditionFailed,
    ServerError,
    TooLarge,
    TransportError,
    Unauthorized,
    Unavailable,
    WbcacheError,
)
from wbcache.models import BatchResult, Item, Page, Record, Written

__all__ = [
    "AsyncClient",
    "BadRequest",
    "BatchResult",
    "Client",
    "Forbidden",
    "Invalid",
    "Item",
    "NotFound",
    "NotPersisted",
    "Page",
    "PreconditionFailed",
    "Record",
    "Retries",
    "ServerError",
    "TooLarge",
    "TransportError",
    "Unauthorized",
    "Unavailable",
    "WbcacheError",
    "Written",
]
