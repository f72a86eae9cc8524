"""Client: the synchronous wbcache client (AsyncClient is the same on asyncio)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from wbcache import _calls
from wbcache._base import client_options, request_options, retries_of
from wbcache._calls import Call, ETag, WriteMode
from wbcache._retry import Outcome, Retries, exchange
from wbcache.models import BatchResult, Item, Page, Record, Written

T = TypeVar("T")


class Client:
    """A wbcache API client. One instance holds one pool of HTTP connections: create it
    once and share it (it is thread-safe); close it, or use it as a context manager.

    ``base_url`` is the API's address (``http://127.0.0.1:8000``); ``api_key`` is sent as
    ``Authorization: Bearer <key>`` (needed when the service sets ``API_KEYS``).
    ``retries`` bounds how often a call is sent again after a 503 (waiting the
    ``Retry-After`` the API asks for) or a lost connection: GET, PUT, DELETE and listing
    are retried; a PATCH or a batch holding a patch only with ``if_match`` (without it, a
    second send could apply the patch twice). Errors raise the exceptions of
    ``wbcache.errors`` (``NotFound``, ``PreconditionFailed``, ``Unavailable``, ...).

    ``if_match`` / ``if_none_match`` take an ETag (``record.etag``), a version
    (``record.version``), ``"*"``, or a list of ETags or versions.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int | Retries = 3,
        headers: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            **client_options(base_url, api_key, timeout, headers), transport=transport
        )
        self._retries = retries_of(retries)

    def _send(self, call: Call[T]) -> T:
        steps = exchange(self._retries, call)
        wait = next(steps)
        while True:
            if wait:
                time.sleep(wait)
            outcome: Outcome
            try:
                outcome = self._http.request(call.method, call.path, **request_options(call))
            except httpx.TransportError as exc:
                outcome = exc
            try:
                wait = steps.send(outcome)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def get(
        self, collection: str, key: str, *, if_none_match: ETag | Sequence[ETag] | None = None
    ) -> Record | None:
        """The record, or None when ``if_none_match`` names its current ETag (304: the
        copy you hold is current). Raises ``NotFound`` if absent or deleted."""
        return self._send(_calls.get(collection, key, if_none_match))

    def put(
        self,
        collection: str,
        key: str,
        document: Any,
        *,
        if_match: ETag | Sequence[ETag] | None = None,
        if_none_match: ETag | Sequence[ETag] | None = None,
        write_mode: WriteMode | None = None,
    ) -> Written:
        """Create or replace a record with ``document`` (any JSON value). ``if_none_match
        ="*"`` creates only; ``if_match`` replaces only that version (else
        ``PreconditionFailed``). ``write_mode="through"`` returns only once Postgres holds
        the write (``NotPersisted`` if it did not in time: the write stays queued)."""
        return self._send(
            _calls.put(collection, key, document, if_match, if_none_match, write_mode)
        )

    def patch(
        self,
        collection: str,
        key: str,
        merge_patch: Any,
        *,
        if_match: ETag | Sequence[ETag] | None = None,
        write_mode: WriteMode | None = None,
    ) -> Record:
        """Apply a JSON merge patch (RFC 7396); returns the merged record. ``NotFound`` if
        absent. Retried after a 503 or a lost answer only with ``if_match``."""
        return self._send(_calls.patch(collection, key, merge_patch, if_match, write_mode))

    def delete(
        self,
        collection: str,
        key: str,
        *,
        if_match: ETag | Sequence[ETag] | None = None,
        write_mode: WriteMode | None = None,
    ) -> Written:
        """Delete a record; returns the delete's version. ``NotFound`` if absent (also
        when a retry finds the first send's delete done)."""
        return self._send(_calls.delete(collection, key, if_match, write_mode))

    def batch(
        self, operations: Sequence[Mapping[str, Any]], *, write_mode: WriteMode | None = None
    ) -> list[BatchResult]:
        """Up to 1,000 operations in one request, as ``POST /v1/batch`` takes them
        (``{"op": "put", "collection": c, "key": k, "document": d}``, ``patch`` with
        ``patch``, ``delete``, ``get``; optional ``if_match`` / ``if_none_match``). Each
        result has its own status and, if it failed, ``error`` (not raised)."""
        return self._send(_calls.batch(operations, write_mode))

    def list(
        self,
        collection: str,
        *,
        prefix: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        include_documents: bool = False,
    ) -> Page:
        """One page of a collection's keys in byte order, from ``cursor`` (a previous
        page's ``next_cursor``); writes not yet persisted included, pending deletes not."""
        return self._send(_calls.list_page(collection, prefix, limit, cursor, include_documents))

    def scan(
        self,
        collection: str,
        *,
        prefix: str | None = None,
        page_size: int | None = None,
        include_documents: bool = False,
    ) -> Iterator[Item]:
        """Every key of a collection (or of ``prefix``), page after page."""
        cursor: str | None = None
        while True:
            page = self.list(
                collection,
                prefix=prefix,
                limit=page_size,
                cursor=cursor,
                include_documents=include_documents,
            )
            yield from page.items
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def stats(self) -> dict[str, Any]:
        """Queue depth, lag, dead letters, workers, hit ratio (``GET /v1/stats``)."""
        return self._send(_calls.stats())

    def invalidate(self, collection: str, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Drop cached copies (of ``keys``, or the whole collection) so the next read loads
        Postgres; pending writes are never dropped. Needs an admin key."""
        return self._send(_calls.invalidate(collection, keys))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
