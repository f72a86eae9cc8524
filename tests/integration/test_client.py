"""The Python client (package ``wbcache``) against real ``wbcache serve`` processes: every
call over a real socket, sync and async (listing included), with the retries a 503 asks
for and the ones it must not make."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from tests.support.procs import ApiProc, WorkerProc
from wbcache import (
    AsyncClient,
    Client,
    Forbidden,
    Invalid,
    NotFound,
    PreconditionFailed,
    Record,
    Retries,
    TransportError,
    Unauthorized,
    Unavailable,
)

Procs = Callable[..., ApiProc | WorkerProc]


@pytest.fixture
def c() -> str:
    """A collection of this test alone: Postgres is shared by every test of the session."""
    return f"t{uuid.uuid4().hex[:12]}"


def serve(procs: Procs, **env: str) -> str:
    api = procs("api", **env)
    assert isinstance(api, ApiProc)
    return api.url


class Sent:
    """What went over the wire: (method, status, monotonic time) per request."""

    def __init__(self) -> None:
        self.log: list[tuple[str, int, float]] = []
        self.lock = threading.Lock()

    def add(self, request: httpx.Request, response: httpx.Response) -> None:
        with self.lock:
            self.log.append((request.method, response.status_code, time.monotonic()))

    @property
    def statuses(self) -> list[int]:
        return [status for _, status, _ in self.log]


class RecordingTransport(httpx.HTTPTransport):
    def __init__(self, sent: Sent) -> None:
        super().__init__()
        self.sent = sent

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.sent.add(request, response)
        return response


class AsyncRecordingTransport(httpx.AsyncHTTPTransport):
    def __init__(self, sent: Sent) -> None:
        super().__init__()
        self.sent = sent

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        self.sent.add(request, response)
        return response


@pytest.fixture
def db(procs: Procs) -> Iterator[Client]:
    with Client(serve(procs), timeout=10) as client:
        yield client


def test_sync_records_etags_and_errors(db: Client, c: str) -> None:
    first = db.put(c, "a/b é", {"name": "Alice"})
    assert first.created and first.etag == f'"{first.version}"'
    again = db.put(c, "a/b é", {"name": "Alice", "age": 30})
    assert not again.created and again.version > first.version

    record = db.get(c, "a/b é")
    assert record == Record(c, "a/b é", again.version, {"name": "Alice", "age": 30})
    assert db.get(c, "a/b é", if_none_match=record.etag) is None  # 304: still current
    assert db.get(c, "a/b é", if_none_match=first.version) == record

    with pytest.raises(PreconditionFailed) as failed:
        db.put(c, "a/b é", {}, if_match=first.etag)
    assert failed.value.etag == record.etag and failed.value.code == "precondition_failed"
    with pytest.raises(PreconditionFailed):
        db.put(c, "a/b é", {}, if_none_match="*")

    patched = db.patch(c, "a/b é", {"age": None, "roles": ["admin"]}, if_match=record.etag)
    assert patched.document == {"name": "Alice", "roles": ["admin"]}
    assert db.get(c, "a/b é") == patched

    # Any JSON value is a document.
    for value in ([1, "two", None], 3.5, "text", None):
        db.put(c, "any", value)
        got = db.get(c, "any")
        assert got is not None and got.document == value

    gone = db.delete(c, "a/b é", if_match=[first.version, patched.version])
    assert gone.version > patched.version
    with pytest.raises(NotFound) as missing:
        db.get(c, "a/b é")
    assert missing.value.status == 404 and missing.value.message
    with pytest.raises(NotFound):
        db.delete(c, "a/b é")
    with pytest.raises(Invalid):
        db.put("Not A Collection", "k", {})

    results = db.batch(
        [
            {"op": "put", "collection": c, "key": "b1", "document": {"n": 1}},
            {"op": "patch", "collection": c, "key": "absent", "patch": {"n": 2}},
            {"op": "get", "collection": c, "key": "any"},
            {"op": "delete", "collection": c, "key": "any"},
        ]
    )
    assert [r.status for r in results] == [201, 404, 200, 204]
    assert results[0].ok and results[0].version is not None
    assert isinstance(results[1].error, NotFound) and not results[1].ok
    assert results[2].document is None  # the document of "any" was JSON null

    stats = db.stats()
    assert stats["pending"] >= 1 and "dead_letters" in stats

    # Listing: pending writes included, the pending delete of "any" not.
    page = db.list(c, limit=1)
    assert page.keys == ["b1"] and page.next_cursor is None
    for i in range(5):
        db.put(c, f"p/{i}", i)
    page = db.list(c, prefix="p/", limit=2, include_documents=True)
    assert page.keys == ["p/0", "p/1"] and [i.document for i in page.items] == [0, 1]
    assert page.next_cursor is not None
    assert db.list(c, prefix="p/", cursor=page.next_cursor).keys == ["p/2", "p/3", "p/4"]
    assert [i.key for i in db.scan(c, page_size=2)] == ["b1", "p/0", "p/1", "p/2", "p/3", "p/4"]


async def test_async_client_and_write_through(procs: Procs, pg: asyncpg.Connection, c: str) -> None:
    url = serve(procs)
    procs("worker")
    async with AsyncClient(url, timeout=10) as db:
        written = await db.put(c, "k", {"v": 1}, write_mode="through")
        # Through: Postgres holds it when the call returns.
        row = await pg.fetchrow(
            "SELECT version FROM records WHERE collection = $1 AND key = 'k'", c
        )
        assert row is not None and row["version"] == written.version
        record = await db.get(c, "k")
        assert record is not None and record.document == {"v": 1}
        assert await db.get(c, "k", if_none_match=record.etag) is None
        patched = await db.patch(c, "k", {"w": 2}, if_match=record.etag)
        assert patched.document == {"v": 1, "w": 2}
        with pytest.raises(PreconditionFailed):
            await db.patch(c, "k", {"w": 3}, if_match=record.etag)
        results = await db.batch(
            [{"op": "get", "collection": c, "key": "k"}, {"op": "get", "collection": c, "key": "x"}]
        )
        assert [r.status for r in results] == [200, 404]
        assert results[0].document == {"v": 1, "w": 2}
        assert [i.document async for i in db.scan(c, include_documents=True)] == [{"v": 1, "w": 2}]
        page = await db.list(c, prefix="k")
        assert page.keys == ["k"] and page.items[0].version == patched.version
        await db.delete(c, "k")
        with pytest.raises(NotFound):
            await db.get(c, "k")
        assert (await db.list(c)).items == []
        assert "pending" in await db.stats()


def test_api_keys(procs: Procs, c: str) -> None:
    url = serve(procs, API_KEYS="rk:read,wk:write,ak:admin")
    with Client(url) as anonymous, Client(url, api_key="rk") as reader:
        with pytest.raises(Unauthorized):
            anonymous.get(c, "k")
        with pytest.raises(Forbidden) as refused:
            reader.put(c, "k", {})
        assert "write" in refused.value.message
    with Client(url, api_key="wk") as writer, Client(url, api_key="ak") as admin:
        writer.put(c, "k", {"a": 1})
        record = writer.get(c, "k")
        assert record is not None and record.document == {"a": 1}
        with pytest.raises(Forbidden):
            writer.invalidate(c, ["k"])
        assert admin.invalidate(c, ["k"]) == {"invalidated": 0, "skipped_pending": 1}


def test_503_is_retried_after_retry_after(procs: Procs, c: str) -> None:
    url = serve(procs, MAX_PENDING="3")
    sent = Sent()
    retries = Retries(attempts=20, max_wait=5)
    with Client(url, retries=retries, transport=RecordingTransport(sent)) as db:
        for i in range(3):
            db.put(c, f"k{i}", {"i": i})
        outcome: list[Any] = []
        # The queue is full: this PUT gets 503 (Retry-After: 1) until a worker drains it.
        writer = threading.Thread(target=lambda: outcome.append(db.put(c, "new", {"n": 1})))
        writer.start()
        deadline = time.monotonic() + 10
        while 503 not in sent.statuses:
            assert time.monotonic() < deadline, sent.statuses
            time.sleep(0.01)
        procs("worker")
        writer.join(30)
        assert outcome and outcome[0].created, sent.statuses
        puts = [(status, at) for method, status, at in sent.log if method == "PUT"][3:]
        assert [s for s, _ in puts[:-1]] == [503] * (len(puts) - 1) and puts[-1][0] == 201
        gaps = [b - a for (_, a), (_, b) in zip(puts, puts[1:], strict=False)]
        assert gaps and min(gaps) >= 0.9, gaps  # the Retry-After: 1 the API asked for


async def test_unsafe_patch_is_not_retried(procs: Procs, pg: asyncpg.Connection, c: str) -> None:
    url = serve(procs, MAX_PENDING="1")
    await pg.execute(
        "INSERT INTO records (collection, key, value, version, updated_at) "
        "VALUES ($1, 'row', '{\"a\": 1}', 5, now())",
        c,
    )
    sent = Sent()
    retries = Retries(attempts=2, max_wait=5)
    transport = AsyncRecordingTransport(sent)
    async with AsyncClient(url, retries=retries, transport=transport) as db:
        await db.put(c, "pending", {})  # the queue is full from now on
        record = await db.get(c, "row")
        assert record is not None and record.version == 5
        sent.log.clear()

        # Without If-Match a second send could apply the patch twice: one send only.
        with pytest.raises(Unavailable) as full:
            await db.patch(c, "row", {"b": 2})
        assert full.value.code == "backpressure" and full.value.retry_after == 1
        assert sent.statuses == [503]

        # With If-Match a repeat is harmless: retried, Retry-After apart.
        sent.log.clear()
        with pytest.raises(Unavailable):
            await db.patch(c, "row", {"b": 2}, if_match=record.etag)
        assert sent.statuses == [503, 503, 503]
        assert sent.log[2][2] - sent.log[0][2] >= 1.8

    assert (await pg.fetchval("SELECT value::text FROM records WHERE key = 'row'")) == '{"a": 1}'


async def test_connection_refused_is_retried_then_raised(c: str) -> None:
    from service.dev.embedded import free_port

    async with AsyncClient(
        f"http://127.0.0.1:{free_port()}", retries=Retries(attempts=2, backoff=0.01)
    ) as db:
        started = asyncio.get_running_loop().time()
        # Never sent (nothing listens): safe to retry even a PATCH without If-Match.
        with pytest.raises(TransportError):
            await db.patch(c, "k", {"a": 1})
        assert asyncio.get_running_loop().time() - started >= 0.02
