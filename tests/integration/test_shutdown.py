"""SIGTERM of the real processes loses nothing: ``serve`` stops accepting and finishes its
in-flight requests within a bounded time, and every write it acknowledged is persisted
later; ``worker`` stops within a bounded time mid-drain and hands its batch back at once,
so a fresh worker persists every key with its version (without waiting for a lease)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx

from service.api.app import build_state
from service.config import Settings
from service.core.record_types import Op, Status, WriteCall
from service.core.repository import StoredRow
from tests.conftest import wait_until
from tests.support.procs import ApiProc, WorkerProc

ProcsFactory = Callable[..., ApiProc | WorkerProc]


async def stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        s: dict[str, Any] = (await client.get("/v1/stats")).json()
        return s


async def wait_settled(url: str, timeout: float) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        s = await stats(url)
        return s if s["pending"] == 0 and s["dead_letters"] == 0 else None

    result: dict[str, Any] = await wait_until(check, timeout, interval=0.2)
    return result


async def wait_exit(proc: ApiProc | WorkerProc, timeout: float) -> tuple[int, float]:
    """Wait (without blocking the loop) for ``proc`` to exit; returns (code, seconds)."""
    assert proc.popen is not None
    started = time.monotonic()
    while proc.popen.poll() is None:
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"{proc.argv[-1]} still running {timeout} s after SIGTERM:\n{proc.output()[-3000:]}"
            )
        await asyncio.sleep(0.05)
    return proc.popen.returncode, time.monotonic() - started


async def persisted_versions(pg: asyncpg.Connection, collection: str) -> dict[str, int]:
    rows = await pg.fetch("SELECT key, version FROM records WHERE collection = $1", collection)
    return {r["key"]: int(r["version"]) for r in rows}


async def test_sigterm_of_serve_under_load_loses_no_acknowledged_write(
    procs: ProcsFactory, pg: asyncpg.Connection, redis: Any
) -> None:
    api = procs("api")
    assert isinstance(api, ApiProc)
    acked: dict[str, int] = {}
    refused = 0
    stop = asyncio.Event()

    async def writer(n: int, client: httpx.AsyncClient) -> None:
        nonlocal refused
        i = 0
        while not stop.is_set():
            key = f"w{n}-{i}"
            i += 1
            try:
                r = await client.put(f"/v1/sd/{key}", json={"writer": n, "i": i})
            except httpx.HTTPError:
                # The server is going away: the write was not acknowledged. Stop once the
                # port is closed for good.
                refused += 1
                if api.popen is not None and api.popen.poll() is not None:
                    return
                await asyncio.sleep(0.01)
                continue
            if 200 <= r.status_code < 300:
                acked[key] = r.json()["version"]
            else:
                refused += 1

    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=api.url, timeout=30, limits=limits) as client:
        tasks = [asyncio.create_task(writer(n, client)) for n in range(24)]
        try:
            await wait_until(lambda: len(acked) >= 500, timeout=60)
            in_load = len(acked)
            api.signal(signal.SIGTERM)
            code, seconds = await wait_exit(api, timeout=20)
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)

    assert seconds < 15, f"serve took {seconds:.1f} s to stop"
    # uvicorn finishes its graceful shutdown, then re-raises the signal.
    assert code in (0, -signal.SIGTERM), api.output()[-3000:]
    assert len(acked) >= in_load

    # A new API and a worker persist every acknowledged write, at its version.
    fresh = procs("api")
    assert isinstance(fresh, ApiProc)
    procs("worker")
    await wait_settled(fresh.url, timeout=60)
    stored = await persisted_versions(pg, "sd")
    missing = {k: v for k, v in acked.items() if stored.get(k) != v}
    assert not missing, (
        f"{len(missing)} acknowledged writes not persisted, e.g. {list(missing.items())[:5]}"
    )


async def _unlink_prefix(redis: Any, prefix: str) -> None:
    """Remove this test's many keys in bulk (quicker than the per-key fixture cleanup)."""
    batch: list[bytes] = []
    async for k in redis.scan_iter(match=f"{prefix}*", count=5000):
        batch.append(k)
        if len(batch) >= 5000:
            await redis.unlink(*batch)
            batch = []
    if batch:
        await redis.unlink(*batch)


async def _seed(settings: Settings, collection: str, n: int) -> dict[str, int]:
    """Queue ``n`` writes to new keys through the service's own write path (the Lua
    script the API calls), without a worker: they all stay pending."""
    state = build_state(settings, process="test-seed")
    sem = asyncio.Semaphore(64)
    empty = StoredRow(None, 0)  # the test truncated Postgres: no row, no delete

    async def one(i: int) -> tuple[str, int]:
        async with sem:
            key = f"k{i:05d}"
            body = b'{"i": %d, "pad": "%s"}' % (i, b"x" * 64)
            r = await state.store.write(WriteCall(Op.PUT, collection, key, body, stored=empty))
            assert r.status is Status.OK, r
            return key, r.version

    try:
        return dict(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await state.aclose()


async def test_sigterm_of_worker_mid_drain_hands_back_its_batches(
    procs: ProcsFactory,
    settings: Settings,
    pg: asyncpg.Connection,
    redis: Any,
) -> None:
    n = 20_000
    versions = await _seed(settings, "sd", n)
    assert len(versions) == n
    p = settings.redis_prefix
    assert await redis.zcard(f"{p}dirty") == n

    # A long lease: if a batch were left held instead of handed back, nobody could take
    # it over for a minute, and the fresh worker below would not finish in time. Several
    # flush loops and small batches: a SIGTERM finds the loops at every step of a flush.
    env = {"LEASE_SECONDS": "60", "BATCH_SIZE": "250", "FLUSH_CONCURRENCY": "8"}
    counters = f"{p}counters"
    flushed = 0
    for _ in range(3):  # three shutdowns in a row, each in the middle of the drain
        before = flushed
        worker = procs("worker", **env)

        async def progressed(before: int = before) -> bool:
            return int(await redis.hget(counters, "flushed") or 0) > before

        await wait_until(progressed, timeout=60, interval=0.005)
        worker.signal(signal.SIGTERM)
        code, seconds = await wait_exit(worker, timeout=30)
        assert code == 0, worker.output()[-3000:]
        assert seconds < 30

        # Stopped, holding nothing: its batches are back in the queue for anyone.
        flushed = int(await redis.hget(counters, "flushed") or 0)
        assert before < flushed < n, f"the drain was not interrupted ({flushed} of {n})"
        held = await redis.hgetall(f"{p}inflight")
        assert not held, (
            f"{len(held)} keys still held by a batch after shutdown:\n{worker.output()[-4000:]}"
        )
        assert await redis.zcard(f"{p}leases") == 0, "a lease is still held after shutdown"
        assert not [k async for k in redis.scan_iter(match=f"{p}b:*")]

    # Handed back means queued again: a batch whose commit raced the shutdown may be both
    # in Postgres and queued (flushing it again is harmless); none may be neither.
    queued = {m.decode().partition(":")[2] for m in await redis.zrange(f"{p}dirty", 0, -1)}
    stored = await persisted_versions(pg, "sd")
    lost = set(versions) - queued - set(stored)
    assert not lost, f"{len(lost)} keys neither persisted nor queued, e.g. {sorted(lost)[:5]}"
    assert queued, "nothing left to drain"

    # A fresh worker persists the rest at once, not after the 60 s lease.
    api = procs("api")
    assert isinstance(api, ApiProc)
    procs("worker", **env)
    await wait_settled(api.url, timeout=45)
    stored = await persisted_versions(pg, "sd")
    assert len(stored) == n
    wrong = {k: (v, stored.get(k)) for k, v in versions.items() if stored.get(k) != v}
    assert not wrong, f"{len(wrong)} keys without their version, e.g. {list(wrong.items())[:5]}"
    await _unlink_prefix(redis, p)
