"""The flush path against the real Redis and Postgres: one clock (Redis ``TIME``) for
leases and readiness, bounded retries of our own bugs, write-through bounded by its
deadline, the retries counter and the per-collection pending counts."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from service.adapters.postgres import PgPool
from service.adapters.redis import create_redis
from service.config import Settings
from service.core import flusher as flusher_module
from service.core.flusher import Flusher
from service.core.redis_keys import Keys
from service.core.scripts import Scripts
from tests.conftest import wait_until

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
