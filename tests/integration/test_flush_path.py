"""The flush path against the real Redis and Postgres: one clock (Redis ``TIME``) for
leases and readiness, bounded retries of our own bugs, write-through bounded by its
deadline, the retries counter and the per-collection pending counts."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.adapters.postgres import PgPool
from service.adapters.redis import create_redis
from service.config import Settings
from service.core import flusher as flusher_module
from service.core import repository
from service.core.flusher import BUG_RETRIES, Flusher
from service.core.redis_keys import Keys
from service.core.scripts import Scripts
from service.dev.embedded import RedisServer
from tests.conftest import running_api, running_worker, wait_until
from tests.integration.test_dead_letters import metric, rows, settled

HOUR_MS = 3_600_000


@pytest.fixture
async def flusher(settings: Settings, pg: asyncpg.Connection, redis: Any) -> AsyncIterator[Flusher]:
    """A flusher of our own (as a worker has), on the test's prefix."""
    client = create_redis("test-flusher", settings)
    pool = PgPool("test-flusher", settings)
    yield Flusher(client, pool, settings, Scripts.register(client))
    await pool.close()
    await client.aclose(close_connection_pool=True)


@contextlib.contextmanager
def skewed_clock(monkeypatch: pytest.MonkeyPatch, offset_ms: int) -> Iterator[None]:
    """This process' clock, as the flusher reads it, ``offset_ms`` off (Redis' is not)."""
    real = flusher_module.now_ms
    with monkeypatch.context() as m:
        m.setattr(flusher_module, "now_ms", lambda: real() + offset_ms)
        yield


async def put(api: httpx.AsyncClient, path: str, doc: Any, **headers: str) -> int:
    r = await api.put(path, json=doc, headers=headers)
    assert r.status_code in (200, 201), r.text
    version: int = r.json()["version"]
    return version


# -- one clock ----------------------------------------------------------------------------


@pytest.mark.parametrize("offset_ms", [-HOUR_MS, HOUR_MS])
async def test_skewed_worker_claims_due_keys_on_time(
    api: httpx.AsyncClient,
    flusher: Flusher,
    settings_factory: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    offset_ms: int,
) -> None:
    delay_ms = 2000
    worker = Flusher(
        flusher.redis, flusher.pg, settings_factory(write_delay_ms=delay_ms), flusher.scripts
    )
    await put(api, "/v1/clock/due", {"a": 1})
    with skewed_clock(monkeypatch, offset_ms):
        # Due WRITE_DELAY_MS after the write on Redis' clock, whatever this process' says:
        # not before (coalescing), and not an hour late.
        wait = await worker.next_ready_in_ms()
        assert wait is not None and 0 < wait <= delay_ms
        assert await worker.claim() is None
        batch = await wait_until(worker.claim, timeout=delay_ms / 1000 + 8)
    assert [i.member for i in batch.items] == ["clock:due"]
    await worker.release(batch, batch.items, [])


async def test_skewed_worker_does_not_expire_live_leases(
    api: httpx.AsyncClient, flusher: Flusher, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    await put(api, "/v1/clock/held", {"a": 1})
    # A worker whose clock is an hour slow claims and renews its lease...
    with skewed_clock(monkeypatch, -HOUR_MS):
        held = await wait_until(flusher.claim, timeout=5)
        await flusher.renew_leases()
    assert [i.member for i in held.items] == ["clock:held"]
    # ... and one whose clock is an hour fast looks for work: the live lease stands.
    other = Flusher(flusher.redis, flusher.pg, settings, flusher.scripts)
    await put(api, "/v1/clock/fresh", {"b": 2})
    with skewed_clock(monkeypatch, HOUR_MS):
        got = await wait_until(other.claim, timeout=5)
    assert [i.member for i in got.items] == ["clock:fresh"]
    keys = Keys(settings.redis_prefix)
    owner = await flusher.redis.hget(keys.inflight, "clock:held")  # type: ignore[misc]
    assert owner == held.id.encode()
    remaining = await flusher.redis.zscore(keys.leases, held.id)
    now = int((await flusher.redis.time())[0]) * 1000
    assert now < remaining <= now + settings.lease_seconds * 1000 + 1000
    await flusher.release(held, held.items, [])
    await other.release(got, got.items, [])


# -- a bug does not pin a batch --------------------------------------------------------


def fail_for_key(monkeypatch: pytest.MonkeyPatch, bad_key: str) -> list[int]:
    """Make OUR code (the repository call) raise a ValueError for any batch that holds
    ``bad_key``; the database itself is untouched. Returns the list of failed calls."""
    real = repository.persist
    failures: list[int] = []

    async def persist(
        conn: asyncpg.Connection, upserts: repository.Columns, deletes: repository.Columns
    ) -> None:
        if bad_key in upserts.keys or bad_key in deletes.keys:
            failures.append(len(upserts) + len(deletes))
            raise ValueError(f"cannot handle {bad_key}")
        await real(conn, upserts, deletes)

    monkeypatch.setattr(repository, "persist", persist)
    return failures


async def test_unexpected_error_dead_letters_only_the_offending_write(
    api: httpx.AsyncClient,
    settings: Settings,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failures = fail_for_key(monkeypatch, "k13")
    docs = {f"k{i:02d}": {"i": i} for i in range(40)}
    for key, doc in docs.items():
        await put(api, f"/v1/bug/{key}", doc)
    async with running_worker(settings):
        s = await settled(api, dead=1, timeout=20)
    assert s["pending"] == 0 and s["dead_letters"] == 1
    # Retried a bounded number of times as a whole, then isolated by splitting.
    assert len(failures) <= BUG_RETRIES + 1 + 12, failures
    letters = (await api.get("/v1/dead-letters")).json()["items"]
    assert [(d["key"], d["sqlstate"]) for d in letters] == [("k13", None)]
    assert letters[0]["error"] == "ValueError: cannot handle k13"
    stored = await rows(pg, "bug")
    assert stored.keys() == docs.keys() - {"k13"}
    assert all(stored[k][0] == docs[k] for k in stored)


# -- write-through is bounded by its timeout -------------------------------------------


async def test_write_through_answers_within_timeout_when_redis_dies_after_commit(
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=False)
    await asyncio.to_thread(server.start)
    try:
        timeout = 2.0
        settings = settings_factory(redis_url=server.url, write_through_timeout=timeout)
        real = repository.persist
        committed: list[str] = []

        async def persist_then_lose_redis(
            conn: asyncpg.Connection, upserts: repository.Columns, deletes: repository.Columns
        ) -> None:
            await real(conn, upserts, deletes)
            committed.extend(upserts.keys)
            server.kill()  # Redis dies right after the commit, before the release

        monkeypatch.setattr(repository, "persist", persist_then_lose_redis)
        async with running_api(settings) as api:
            started = time.monotonic()
            r = await asyncio.wait_for(
                api.put("/v1/wt/k", json={"a": 1}, headers={"Write-Mode": "through"}),
                timeout + 10,
            )
            elapsed = time.monotonic() - started
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "not_persisted"
            assert elapsed < timeout + 0.5, elapsed
        assert committed == ["k"]
        assert (await rows(pg, "wt")) == {"k": ({"a": 1}, int(r.headers["ETag"].strip('"')))}
    finally:
        await asyncio.to_thread(server.kill)


# -- retries are counted ----------------------------------------------------------------


async def test_flush_retries_counted_during_a_postgres_outage(
    api: httpx.AsyncClient, settings_factory: Callable[..., Settings]
) -> None:
    before = (await api.get("/v1/stats")).json()
    assert before["flush_retries"] == 0
    assert metric((await api.get("/metrics")).text, "wbcache_flush_retries_total") == 0
    await put(api, "/v1/outage/k", {"a": 1})
    unreachable = settings_factory(database_url="postgresql://postgres@127.0.0.1:1/wbcache")

    async def retried(n: int) -> bool:
        s = (await api.get("/v1/stats")).json()
        return bool(s["flush_retries"] >= n)

    async with running_worker(unreachable):
        await wait_until(lambda: retried(2), timeout=15)
        first = metric((await api.get("/metrics")).text, "wbcache_flush_retries_total")
        assert first >= 2
        await wait_until(lambda: retried(int(first) + 1), timeout=15)
    s = (await api.get("/v1/stats")).json()
    assert s["pending"] == 1 and s["dead_letters"] == 0  # an outage dead-letters nothing
    assert s["flush_failures"] >= s["flush_retries"] > first
