"""What only a real server shows: a ``wbcache serve`` process (uvicorn, httptools) and a
``wbcache worker`` process. uvicorn decodes the path before routing and sets no body
limit; the service must take keys from the raw path and enforce MAX_DOCUMENT_BYTES."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest

from tests.conftest import wait_drained
from tests.support.procs import ApiProc, WorkerProc

if TYPE_CHECKING:  # a class named Test* must not be collected as a test class
    from tests.support.servers import TestServers


MIB = 1024 * 1024


@pytest.fixture
async def pg(servers: TestServers) -> AsyncIterator[asyncpg.Connection]:
    """conftest's ``pg`` without its TRUNCATE (slow under load): every test here writes only
    to collections of its own, so nothing another test left in Postgres can meet it."""
    conn = await asyncpg.connect(servers.database_url)
    yield conn
    await conn.close()


@pytest.fixture
def c() -> str:
    """A collection of this test alone: Postgres is shared by every test of the session."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def client(
    procs: Callable[..., ApiProc | WorkerProc], pg: asyncpg.Connection
) -> AsyncIterator[httpx.AsyncClient]:
    api = procs("api")
    assert isinstance(api, ApiProc)
    async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
        yield http


def assert_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def test_keys_come_from_the_raw_path_and_the_worker_persists_them(
    client: httpx.AsyncClient,
    procs: Callable[..., ApiProc | WorkerProc],
    pg: asyncpg.Connection,
    c: str,
) -> None:
    procs("worker")

    # %2F is part of the key, not a separator.
    r = await client.put(f"/v1/{c}/a%2Fb", json={"slash": True})
    assert r.status_code == 201, r.text
    assert r.json()["key"] == "a/b"
    got = await client.get(f"/v1/{c}/a%2Fb")
    assert got.status_code == 200 and got.json() == {"slash": True}
    assert_error(await client.get(f"/v1/{c}/a/b"), 404)
    assert_error(await client.get(f"/v1/{c}/a"), 404)

    # %FF and %FE are invalid UTF-8: both refused, neither collides with U+FFFD.
    r = await client.put(f"/v1/{c}/%EF%BF%BD", json={"replacement": True})
    assert r.status_code == 201, r.text
    for raw in ("%FF", "%FE", "a%FFb"):
        assert_error(await client.put(f"/v1/{c}/{raw}", json={"raw": raw}), 422)
        assert_error(await client.get(f"/v1/{c}/{raw}"), 422)
    assert (await client.get(f"/v1/{c}/%EF%BF%BD")).json() == {"replacement": True}

    # Other encodings of one key are that key; the query string is not part of it.
    r = await client.put(f"/v1/{c}/%C3%A9t%C3%A9%20x", json={"utf8": 1})
    assert r.status_code == 201 and r.json()["key"] == "été x"
    assert (await client.get(f"/v1/{c}/été x")).json() == {"utf8": 1}
    assert (await client.get(f"/v1/{c}/%C3%A9t%C3%A9%20x?ignored=1")).json() == {"utf8": 1}

    # HEAD: the headers of a GET, no body.
    full = await client.get(f"/v1/{c}/a%2Fb")
    head = await client.head(f"/v1/{c}/a%2Fb")
    assert head.status_code == 200
    assert head.content == b""
    for name in ("etag", "cache-control", "x-cache", "content-length", "content-type"):
        assert head.headers[name] == full.headers[name], name
    assert int(head.headers["content-length"]) == len(full.content)
    missing = await client.head(f"/v1/{c}/absent")
    assert missing.status_code == 404 and missing.content == b""

    # Routing errors of the real server carry the JSON error body too.
    assert_error(await client.get("/v2/nothing"), 404)
    assert_error(await client.post(f"/v1/{c}/k", json={}), 405)
    assert_error(await client.put("/v1/stats", json={}), 405)

    # The worker process persists every one of them, under the decoded key.
    await wait_drained(client, timeout=30)
    rows = await pg.fetch(
        "SELECT key, value::text AS value, version FROM records WHERE collection = $1", c
    )
    stored = {row["key"]: json.loads(row["value"]) for row in rows}
    assert stored == {"a/b": {"slash": True}, "\ufffd": {"replacement": True}, "été x": {"utf8": 1}}
    versions = {row["key"]: row["version"] for row in rows}
    assert full.headers["etag"] == f'"{versions["a/b"]}"'


async def test_body_limit_is_enforced(client: httpx.AsyncClient, c: str) -> None:
    # Default MAX_DOCUMENT_BYTES is 1 MiB: a 2 MiB document is refused.
    doc = b'{"big": "' + b"x" * (2 * MIB) + b'"}'
    r = await client.put(f"/v1/{c}/k", content=doc, headers={"Content-Type": "application/json"})
    assert_error(r, 413)

    # Without a Content-Length (chunked), the limit holds while the body streams in.
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"big": "'
        for _ in range(64):  # 16 MiB
            yield b"x" * (256 * 1024)
        yield b'"}'

    try:
        r = await client.put(
            f"/v1/{c}/k", content=chunks(), headers={"Content-Type": "application/json"}
        )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pass  # the server answered and closed before the client finished sending: refused
    else:
        assert_error(r, 413)

    # Just under the limit is fine, and nothing of the refused bodies was stored.
    assert_error(await client.get(f"/v1/{c}/k"), 404)
    ok = b'{"big":"' + b"x" * (MIB - 64) + b'"}'
    r = await client.put(f"/v1/{c}/k", content=ok, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    assert len((await client.get(f"/v1/{c}/k")).content) == len(ok)
