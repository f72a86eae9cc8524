"""AsyncClient: Client on asyncio. Each method does what Client's of the same name does
(its docstring says what); the requests and answers are built and read by the same code
(wbcache/_calls.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from wbcache import _calls
from wbcache._base import client_options, request_options, retries_of
from wbcache._calls import Call, ETag, WriteMode
from wbcache._retry import Outcome, Retries, exchange
from wbcache.models import BatchResult, Item, Page, Record, Written

T = TypeVar("T")


class AsyncClient:
    """The asyncio wbcache client: ``async with AsyncClient(url) as db: await db.get(...)``.
    Options and behaviour as ``Client``'s; one instance per event loop, shared by its
    tasks."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int | Retries = 3,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            **client_options(base_url, api_key, timeout, headers), transport=transport
        )
        self._retries = retries_of(retries)

    async def _send(self, call: Call[T]) -> T:
        steps = exchange(self._retries, call)
        wait = next(steps)
        while True:
            if wait:
                await asyncio.sleep(wait)
            outcome: Outcome
            try:
                outcome = await self._http.request(call.method, call.path, **request_options(call))
            except httpx.TransportError as exc:
                outcome = exc
            try:
                wait = steps.send(outcome)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    async def get(
        self, collection: str, key: str, *, if_none_match: ETag | Sequence[ETag] | None = None
    ) -> Record | None:
        """See ``Client.get``."""
        return await self._send(_calls.get(collection, key, if_none_match))

    async def put(
        self,
        collection: str,
        key: str,
        document: Any,
        *,
        if_match: ETag | Sequence[ETag] | None = None,
        if_none_match: ETag | Sequence[ETag] | None = None,
        write_mode: WriteMode | None = None,
    ) -> Written:
        """See ``Client.put``."""
        call = _calls.put(collection, key, document, if_match, if_none_match, write_mode)
        return await self._send(call)

    async def patch(
        self,
        collection: str,
        key: str,
        merge_patch: Any,
        *,
        if_match: ETag | Sequence[ETag] | None = None,
        write_mode: WriteMode | None = None,
    ) -> Record:
        """See ``Client.patch``."""
        return await self._send(_calls.patch(collection, key, merge_patch, if_match, write_mode))

    async def delete(
        self,
        collection: str,
        key: str,
        *,
        if_match: ETag | Sequence[ETag] | None = None,
        write_mode: WriteMode | None = None,
    ) -> Written:
        """See ``Client.delete``."""
        return await self._send(_calls.delete(collection, key, if_match, write_mode))

    async def batch(
        self, operations: Sequence[Mapping[str, Any]], *, write_mode: WriteMode | None = None
    ) -> list[BatchResult]:
        """See ``Client.batch``."""
        return await self._send(_calls.batch(operations, write_mode))

    async def list(
        self,
        collection: str,
        *,
        prefix: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        include_documents: bool = False,
    ) -> Page:
        """See ``Client.list``."""
        call = _calls.list_page(collection, prefix, limit, cursor, include_documents)
        return await self._send(call)

    async def scan(
        self,
        collection: str,
        *,
        prefix: str | None = None,
        page_size: int | None = None,
        include_documents: bool = False,
    ) -> AsyncIterator[Item]:
        """See ``Client.scan`` (``async for item in db.scan(...)``)."""
        cursor: str | None = None
        while True:
            call = _calls.list_page(collection, prefix, page_size, cursor, include_documents)
            page = await self._send(call)
            for item in page.items:
                yield item
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def stats(self) -> dict[str, Any]:
        """See ``Client.stats``."""
        return await self._send(_calls.stats())

    async def invalidate(
        self, collection: str, keys: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """See ``Client.invalidate``."""
        return await self._send(_calls.invalidate(collection, keys))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
