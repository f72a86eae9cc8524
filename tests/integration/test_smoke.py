"""The write-behind round trip: accept in Redis, persist in Postgres, read back."""

from __future__ import annotations

import asyncpg
import httpx
from arq.worker import Worker

from tests.conftest import wait_drained


async def test_put_is_persisted_by_the_worker(
    api: httpx.AsyncClient, worker: Worker, pg: asyncpg.Connection
) -> None:
    r = await api.put("/v1/users/alice", json={"name": "Alice", "age": 30})
    assert r.status_code == 201
    version = r.json()["version"]
    assert r.headers["etag"] == f'"{version}"'
    await wait_drained(api)
    row = await pg.fetchrow("SELECT value::text, version FROM records WHERE key = 'alice'")
    assert row is not None
    assert row["version"] == version
    got = await api.get("/v1/users/alice")
    assert got.status_code == 200
    assert got.json() == {"name": "Alice", "age": 30}
    assert got.headers["x-cache"] == "hit"
