"""Faults under load: workers SIGKILLed and SIGTERMed, Postgres stopped, Redis restarted.

Each test runs real ``wbcache serve`` / ``wbcache worker`` processes under a mixed write
load (tests/integration/load.py) and ends with the checker: no acknowledged write lost,
Postgres equal to what every API process serves, no dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from service.adapters.migrate import migrate
from service.adapters.redis import create_redis
from service.config import Settings
from service.core.redis_keys import Keys
from service.dev.embedded import PostgresServer, RedisServer
from tests.conftest import wait_until
from tests.integration.load import Load
from tests.support.procs import ApiProc, Proc, WorkerProc
from tests.support.servers import TestServers as Servers
from tests.support.servers import data_dir

pytestmark = pytest.mark.chaos

Procs = Callable[..., ApiProc | WorkerProc]


def _api(procs: Procs, **env: str) -> ApiProc:
    p = procs("api", **env)
    assert isinstance(p, ApiProc)
    return p


def _alive(p: Proc) -> bool:
    return p.popen is not None and p.popen.poll() is None


def _logs(*ps: Proc) -> str:
    return "\n".join(f"--- {p.log.name}:\n{p.output()[-2500:]}" for p in ps)


def _collection() -> str:
    return f"chaos-{uuid.uuid4().hex[:8]}"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def _get_json(url: str) -> tuple[int, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.get(url)
        return r.status_code, r.json()


class _Background:
    """The load running in a task, stopped (and awaited) on exit even when a test fails."""

    def __init__(self, load: Load, max_seconds: float) -> None:
        self.load = load
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(load.run(stop=self.stop, max_seconds=max_seconds))

    async def finish(self) -> None:
        self.stop.set()
        await self.task


@dataclass
class LeaseWatch:
    abandoned: set[str] = field(default_factory=set)  # lease not renewed: its worker died
    taken_over: set[str] = field(default_factory=set)  # ... and then handed to another


@pytest.fixture
async def leases_watch(redis: Any, settings: Settings) -> AsyncIterator[LeaseWatch]:
    """Watch the batch leases: a live worker renews its leases every lease_seconds / 3, so
    a lease left unchanged for 0.6 x lease_seconds belongs to a dead worker; when it is
    gone afterwards, another worker took the batch over."""
    keys = Keys(settings.redis_prefix)
    found = LeaseWatch()
    stop = asyncio.Event()
    stale_after = 0.6 * settings.lease_seconds

    async def watch() -> None:
        seen: dict[str, tuple[float, float]] = {}  # batch -> (lease until, since when)
        while not stop.is_set():
            try:
                leases = await redis.zrange(keys.leases, 0, -1, withscores=True)
            except Exception:  # noqa: BLE001 - keep watching; a test's checks decide
                leases = None
            if leases is not None:
                now = time.monotonic()
                current = {b.decode(): until for b, until in leases}
                for batch, until in current.items():
                    if batch not in seen or seen[batch][0] != until:
                        seen[batch] = (until, now)
                    elif now - seen[batch][1] > stale_after:
                        found.abandoned.add(batch)
                for batch in list(seen):
                    if batch not in current:
                        del seen[batch]
                        if batch in found.abandoned:
                            found.taken_over.add(batch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)

    task = asyncio.create_task(watch())
    yield found
    stop.set()
    await task


async def _wait_batch_held(redis: Any, settings: Settings, timeout: float) -> bool:
    """Wait (briefly) for a moment when some worker holds a batch."""
    keys = Keys(settings.redis_prefix)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await redis.zcard(keys.leases):
            return True
        await asyncio.sleep(0.01)
    return False


async def _blocked_worker_pid(conn: asyncpg.Connection, timeout: float) -> int | None:
    """The pid of a ``wbcache worker`` whose flush waits for a row lock, if one shows up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = await conn.fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND application_name LIKE 'wbcache-worker-%'"
        )
        for row in names:
            return int(row["application_name"].rsplit("-", 1)[1])
        await asyncio.sleep(0.01)
    return None


async def test_worker_sigkill_every_1_5_s_loses_nothing(
    procs: Procs,
    servers: Servers,
    pg: asyncpg.Connection,
    leases_watch: LeaseWatch,
) -> None:
    api = _api(procs)
    workers: list[Proc] = [procs("worker"), procs("worker")]
    killed: list[Proc] = []
    held_kills = 0
    load = Load([api.url], _collection(), keys=300, clients=32)
    watcher = await asyncpg.connect(servers.database_url)
    bg = _Background(load, max_seconds=50)
    try:
        await load.wait_acked(300)
        t0 = time.monotonic()
        cycle = 0
        while (elapsed := time.monotonic() - t0) < 12 or (held_kills < 2 and elapsed < 25):
            cycle += 1
            # Row locks on a third of the keys make some worker's flush wait inside its
            # transaction: that worker holds a batch (and its lease) right now. SIGKILL it
            # (every other cycle; else the older worker): its batch must be taken over when
            # the lease runs out.
            victim: Proc | None = None
            if cycle % 2:
                async with pg.transaction():
                    await pg.execute(
                        "SELECT 1 FROM records WHERE collection = $1 AND key = ANY($2::text[]) "
                        "FOR UPDATE",
                        load.collection,
                        load.keys[cycle % 3 :: 3],
                    )
                    pid = await _blocked_worker_pid(watcher, timeout=1.5)
                    victim = next((w for w in workers if _alive(w) and w.pid == pid), None)
                    if victim is not None:
                        victim.kill()
                        held_kills += 1
            if victim is None:
                victim = workers[0]
                victim.kill()
            workers.remove(victim)
            killed.append(victim)
            workers.append(procs("worker"))
            await asyncio.sleep(1.5)
        chaos_seconds = time.monotonic() - t0
    finally:
        await bg.finish()
        await watcher.close()
    report = await load.check(servers.database_url, drain_timeout=45)
    print(
        f"\n{len(killed)} SIGKILLs in {chaos_seconds:.1f}s ({held_kills} mid-flush), "
        f"{len(leases_watch.abandoned)} abandoned batches, "
        f"{len(leases_watch.taken_over)} taken over; {load.elapsed:.1f}s of load: "
        f"{dict(load.counts)}\n{report.summary()}"
    )
    report.assert_ok()
    assert load.unknown == 0, load.counts
    assert held_kills >= 2, "no worker was killed while holding a batch"
    assert leases_watch.taken_over, "no abandoned batch seen taken over: not exercised"
    assert all(_alive(w) for w in workers), _logs(*workers)
    assert report.stats["workers"] >= 2, report.stats


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """A data directory for a throwaway Postgres (see tests.support.servers.data_dir)."""
    with data_dir("wbcache-chaos-") as path:
        yield path


async def test_postgres_outage_of_10_s_under_load(procs: Procs, server_dir: Path) -> None:
    server = PostgresServer(server_dir / "pg", fsync=False)
    await asyncio.to_thread(server.start)
    started: list[Proc] = []
    try:
        url = _with_database(server.url, "wbcache")
        await asyncio.to_thread(migrate, url)
        api = _api(procs, database_url=url)
        started += [api, procs("worker", database_url=url), procs("worker", database_url=url)]

        load = Load([api.url], _collection(), keys=300, clients=32)
        await load.warm()  # every key cached: writes need no Postgres read
        bg = _Background(load, max_seconds=55)
        try:
            await load.wait_acked(load.acked + 1000)
            _, before = await _get_json(f"{api.url}/v1/stats")
            await asyncio.to_thread(server.stop)
            t_stop = time.monotonic()
            acked_at_stop, unknown_at_stop = load.acked, load.unknown

            # For ~10 s: writes keep being acknowledged, /readyz stays 200 and names
            # Postgres down, the queue grows.
            readyz: list[tuple[int, Any]] = []
            pending: list[int] = []
            while time.monotonic() - t_stop < 10:
                readyz.append(await _get_json(f"{api.url}/readyz"))
                t_sample = time.monotonic()
                status, s = await _get_json(f"{api.url}/v1/stats")
                assert status == 200, s
                pending.append(s["pending"])
                await asyncio.sleep(0.2)
            # Every key with a write acknowledged during the outage is pending.
            written = {
                key
                for key, h in load.history.items()
                if any(t_stop < w.started and w.ended < t_sample for w in h.acks)
            }
            acked_during = load.acked - acked_at_stop
            unknown_during = load.unknown - unknown_at_stop

            await asyncio.to_thread(server.start)
            t_up = time.monotonic()
            await load.wait_acked(load.acked + 500)
        finally:
            await bg.finish()
        report = await load.check(url, drain_timeout=45)
        drained_after = time.monotonic() - t_up
        print(
            f"\noutage: {acked_during} writes acknowledged to {len(written)} keys, "
            f"{unknown_during} not; pending {before['pending']} -> {pending[-1]}; drained "
            f"{drained_after:.1f}s after "
            f"restart; {dict(load.counts)}\n{report.summary()}"
        )
        report.assert_ok()
        assert unknown_during == 0 and load.unknown == 0, load.counts
        assert acked_during > 200, acked_during
        assert all(code == 200 for code, _ in readyz), readyz
        down = [body for _, body in readyz if str(body.get("postgres", "")).startswith("down")]
        assert down, f"/readyz never named Postgres down: {readyz[-3:]}"
        assert pending[-1] >= len(written) > 50, (len(written), before, pending)
        assert report.stats["dead_letters"] == 0
        assert report.stats["flush_failures"] > 0, report.stats  # the retries are visible
    finally:
        for p in started:
            p.stop()
        await asyncio.to_thread(server.stop)


@pytest.mark.parametrize("moment", ["mid-flush", "any"])
async def test_worker_sigterm_exits_promptly_and_loses_nothing(
    procs: Procs,
    servers: Servers,
    pg: asyncpg.Connection,
    redis: Any,
    settings: Settings,
    moment: str,
) -> None:
    api = _api(procs)
    workers: list[Proc] = [procs("worker"), procs("worker")]
    load = Load([api.url], _collection(), keys=300, clients=32)
    watcher = await asyncpg.connect(servers.database_url)
    bg = _Background(load, max_seconds=50)
    try:
        await load.wait_acked(800)
        if moment == "mid-flush":
            # Row locks make a worker's flush wait inside its transaction; SIGTERM that
            # worker while it holds the batch. The locks go after 5 s at most: the worker
            # may finish the batch or hand it back, but not hang on.
            tx = pg.transaction()
            await tx.start()
            try:
                await pg.execute(
                    "SELECT 1 FROM records WHERE collection = $1 AND key = ANY($2::text[]) "
                    "FOR UPDATE",
                    load.collection,
                    load.keys[::2],
                )
                pid = await _blocked_worker_pid(watcher, timeout=10)
                victim = next(w for w in workers if w.pid == pid)
                t0 = time.monotonic()
                victim.signal(signal.SIGTERM)
                rc = await asyncio.to_thread(victim.wait, 5)
            finally:
                await tx.rollback()
            if rc is None:
                rc = await asyncio.to_thread(victim.wait, 25)
        else:
            await _wait_batch_held(redis, settings, timeout=2)
            victim = workers[0]
            t0 = time.monotonic()
            rc = await asyncio.to_thread(victim.terminate, 30)
        exit_seconds = time.monotonic() - t0
        # The other worker carries on alone.
        await load.wait_acked(load.acked + 600)
    finally:
        await bg.finish()
        await watcher.close()
    report = await load.check(servers.database_url, drain_timeout=45)
    print(
        f"\nSIGTERMed worker ({moment}) exited with {rc} in {exit_seconds:.2f}s; "
        f"{dict(load.counts)}\n{report.summary()}"
    )
    assert rc is not None, f"worker still running 30 s after SIGTERM\n{_logs(victim)}"
    assert exit_seconds < 30
    assert rc == 0, _logs(victim)
    report.assert_ok()
    assert load.unknown == 0, load.counts
    survivor = next(w for w in workers if w is not victim)
    assert _alive(survivor), _logs(survivor)


async def _queue_state(redis_url: str, prefix: str) -> str:
    """The queue's bookkeeping in Redis, for a failure message."""
    keys = Keys(prefix)
    client = create_redis("test", Settings(redis_url=redis_url, redis_prefix=prefix))
    try:
        now = time.time() * 1000
        leases = await client.zrange(keys.leases, 0, -1, withscores=True)
        inflight = await client.hgetall(keys.inflight)  # type: ignore[misc]
        dirty = await client.zrange(keys.dirty, 0, 20)
    finally:
        await client.aclose()
    return (
        f"leases (ms left): {[(b.decode(), round(s - now)) for b, s in leases]}\n"
        f"inflight: {inflight}\ndirty: {dirty}"
    )


async def test_redis_restart_with_aof_under_load(
    procs: Procs, servers: Servers, pg: asyncpg.Connection, tmp_path: Path, prefix: str
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    started: list[Proc] = []
    try:
        api = _api(procs, redis_url=server.url)
        workers = [procs("worker", redis_url=server.url), procs("worker", redis_url=server.url)]
        started += [api, *workers]
        load = Load([api.url], _collection(), keys=300, clients=32, retries=3, retry_delay=0.3)
        bg = _Background(load, max_seconds=50)
        try:
            await load.wait_acked(1500)
            await asyncio.to_thread(server.stop)
            unknown_at_stop = load.unknown
            # Clients are refused (503 / connection errors), not acknowledged; stay down
            # for a few rounds of their retries (a couple of seconds).
            await load.wait_unknown(unknown_at_stop + 96, timeout=15)
            status, body = await _get_json(f"{api.url}/readyz")
            assert status == 503, body
            await asyncio.to_thread(server.start)  # same port, data from the AOF
            acked_at_restart = load.acked
            await load.wait_acked(acked_at_restart + 1500, timeout=30)
        finally:
            await bg.finish()
        # The workers must survive the restart (else nothing drains).
        assert all(_alive(w) for w in workers), _logs(*workers)
        try:
            report = await load.check(servers.database_url, drain_timeout=45)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await _queue_state(server.url, prefix)}") from None
        print(f"\n{dict(load.counts)}\n{report.summary()}")
        report.assert_ok()
    finally:
        for p in started:
            p.stop()
        await asyncio.to_thread(server.stop)


async def test_redis_outage_while_a_flush_waits_in_postgres(
    procs: Procs, servers: Servers, pg: asyncpg.Connection, tmp_path: Path, prefix: str
) -> None:
    """Deterministic: the worker's transaction commits while Redis is down, so it cannot
    release the batch at once. Once Redis is back, the batch must not stay stranded (its
    keys in flight forever): pending drains and a newer write to the key is persisted."""
    server = RedisServer(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    api = _api(procs, redis_url=server.url)
    worker = procs("worker", redis_url=server.url)
    collection, key = _collection(), "stranded"
    watcher = await asyncpg.connect(servers.database_url)

    async def row_version() -> int | None:
        v: int | None = await pg.fetchval(
            "SELECT version FROM records WHERE collection = $1 AND key = $2", collection, key
        )
        return v

    async def put(http: httpx.AsyncClient, doc: Any) -> int:
        async def attempt() -> int | None:
            try:
                r = await http.put(f"/v1/{collection}/{key}", json=doc)
            except httpx.TransportError:
                return None
            return int(r.json()["version"]) if r.status_code in (200, 201) else None

        version: int = await wait_until(attempt, timeout=20, interval=0.1)
        return version

    try:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as http:
            v1 = await put(http, {"v": 1})
            await wait_until(lambda: _equals(row_version(), v1), timeout=20)

            tx = pg.transaction()
            await tx.start()
            try:
                await pg.execute(
                    "SELECT 1 FROM records WHERE collection = $1 AND key = $2 FOR UPDATE",
                    collection,
                    key,
                )
                v2 = await put(http, {"v": 2})
                assert await _blocked_worker_pid(watcher, timeout=20) == worker.pid
                await asyncio.to_thread(server.stop)
            finally:
                await tx.rollback()
            # The flush of v2 commits now, with Redis down; the outage lasts a few more
            # seconds (the worker's release and its poll loop meet it).
            await wait_until(lambda: _equals(row_version(), v2), timeout=20)
            await asyncio.sleep(2)
            await asyncio.to_thread(server.start)

            v3 = await put(http, {"v": 3})
            try:
                await wait_until(lambda: _equals(row_version(), v3), timeout=30)
                stats = await wait_until(lambda: _drained(http), timeout=30)
            except AssertionError:
                raise AssertionError(
                    f"v3={v3} not persisted (Postgres has {await row_version()}); worker "
                    f"alive: {_alive(worker)}\n{await _queue_state(server.url, prefix)}\n"
                    f"{_logs(worker)}"
                ) from None
            assert stats["dead_letters"] == 0, stats
            assert _alive(worker), _logs(worker)
    finally:
        await watcher.close()
        api.stop()
        worker.stop()
        await asyncio.to_thread(server.stop)


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def _drained(http: httpx.AsyncClient) -> dict[str, Any] | None:
    try:
        r = await http.get("/v1/stats")
    except httpx.TransportError:
        return None
    s: dict[str, Any] = r.json()
    return s if r.status_code == 200 and s["pending"] == 0 else None
