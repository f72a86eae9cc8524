"""The flush path against the real Redis and Postgres: one clock (Redis ``TIME``) for
leases and readiness, bounded retries of our own bugs, write-through bounded by its
deadline, the retries counter and the per-collection pending counts."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.adapters.postgres import PgPool
from service.adapters.redis import create_redis
from service.config import Settings
from service.core import flusher as flusher_module
from service.core import repository, stats
from service.core.flusher import BUG_RETRIES, Flusher
from service.core.key_filter_build import incomplete, server_run_id
from service.core.redis_keys import Keys
from service.core.scripts import Scripts
from service.core.write_through import Outcome, WriteThrough
from service.dev.embedded import RedisServer
from tests.conftest import running_api, running_worker, wait_until
from tests.integration.test_dead_letters import metric, poison_constraint, rows, settled
from worker import flush as flush_jobs
from worker import settings as worker_settings_module

HOUR_MS = 3_600_000


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
            assert elapsed < timeout + 1.0, elapsed
        assert committed == ["k"]
        assert (await rows(pg, "wt")) == {"k": ({"a": 1}, int(r.headers["ETag"].strip('"')))}
    finally:
        await asyncio.to_thread(server.kill)


async def test_write_through_learns_a_commit_another_flusher_made(
    api: httpx.AsyncClient, flusher: Flusher, pg: asyncpg.Connection
) -> None:
    """A write-through whose key another flusher holds waits for that flusher's commit:
    once released, the entry is neither dirty, in flight nor dead-lettered, which is what
    committed.lua answers COMMITTED on (release sets 'p' only on entries that stay
    pending); a version superseded by a committed newer one is committed too; a poison
    write is DEAD."""
    through = WriteThrough(Flusher(flusher.redis, flusher.pg, flusher.settings, flusher.scripts))
    v1 = await put(api, "/v1/wth/k", {"v": 1})
    held = await wait_until(lambda: flusher.claim(["wth:k"]), timeout=5)
    waiting = asyncio.create_task(through("wth:k", v1, 10.0))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # the other flusher holds the key: nothing to claim
    assert await flusher.flush_batch(held)
    assert await waiting is Outcome.COMMITTED
    p = await flusher.redis.hget(flusher.keys.entry("wth", "k"), "p")  # type: ignore[misc]
    assert int(p or 0) < v1  # (the write's version floor, 0: a new key)

    v2 = await put(api, "/v1/wth/k", {"v": 2})
    await put(api, "/v1/wth/k", {"v": 3})
    assert await through("wth:k", v2, 10.0) is Outcome.COMMITTED  # with v3
    assert (await rows(pg, "wth"))["k"][0] == {"v": 3}

    async with poison_constraint(pg):
        v4 = await put(api, "/v1/wth/p", {"poison": True})
        assert await through("wth:p", v4, 10.0) is Outcome.DEAD


async def test_a_cancelled_flush_that_cannot_hand_back_lets_its_lease_run_out(
    api: httpx.AsyncClient,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A flush cancelled while Redis is unreachable (the flusher's TaskGroup cancels its
    other loops when one fails) cannot hand its batch back. It must leave the batches the
    heartbeat renews: kept there, its lease was renewed for as long as the worker lived
    and nobody flushed it (a polling worker stuck with pending keys after a Cluster
    primary's SIGKILL, tests/integration/test_cluster_chaos.py). Its lease runs out and
    a claim takes it over."""
    settings = settings_factory(lease_seconds=0.5)
    client = create_redis("test-flusher", settings)
    pool = PgPool("test-flusher", settings)
    flusher = Flusher(client, pool, settings, Scripts.register(client))
    try:
        version = await put(api, "/v1/cancelled/k", {"a": 1})
        batch = await wait_until(flusher.claim, timeout=5)
        flushing = asyncio.Event()

        async def stuck(*args: Any, **kwargs: Any) -> Any:
            flushing.set()
            await asyncio.Event().wait()

        async def unreachable(*args: Any, **kwargs: Any) -> None:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:7000.")

        with monkeypatch.context() as m:
            m.setattr(flusher, "persist_once", stuck)
            task = asyncio.create_task(flusher.flush_batch(batch))
            await flushing.wait()
            m.setattr(flusher, "release", unreachable)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert batch.id not in flusher.held

        async def taken_over() -> Any:
            await flusher.renew_leases("w")  # the heartbeat goes on meanwhile
            return await flusher.claim()

        again = await wait_until(taken_over, timeout=10, interval=0.1)
        assert [(i.member, int(i.version)) for i in again.items] == [("cancelled:k", version)]
        assert await flusher.flush_batch(again)
        assert await rows(pg, "cancelled") == {"k": ({"a": 1}, version)}
    finally:
        await pool.close()
        await client.aclose(close_connection_pool=True)


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


# -- pending per collection, kept by the scripts ------------------------------------------


async def pending_snapshot(flusher: Flusher) -> tuple[dict[str, int], dict[str, int]]:
    """(the kept per-collection counts, the true ones from the members), read atomically."""
    keys = flusher.keys
    async with flusher.redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.pending_counts)
        pipe.zrange(keys.dirty, 0, -1)
        pipe.hkeys(keys.inflight)
        raw, dirty, inflight = await pipe.execute()
    kept = {c.decode(): int(n) for c, n in raw.items()}
    truth = Counter(m.split(b":", 1)[0].decode() for m in [*dirty, *inflight])
    return kept, dict(truth)


async def assert_counts(flusher: Flusher, expected: dict[str, int] | None = None) -> None:
    kept, truth = await pending_snapshot(flusher)
    assert kept == truth, (kept, truth)
    if expected is not None:
        assert truth == expected


async def test_pending_counts_follow_every_transition(
    api: httpx.AsyncClient,
    flusher: Flusher,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
) -> None:
    settings = settings_factory(write_delay_ms=0)  # every key is ready at once
    flusher = Flusher(flusher.redis, flusher.pg, settings, flusher.scripts)
    async with poison_constraint(pg):
        for i in range(10):
            await put(api, f"/v1/pa/k{i}", {"i": i})
        for i in range(5):
            await put(api, f"/v1/pb/k{i}", {"i": i})
        await put(api, "/v1/pc/p", {"poison": True})
        assert (await api.delete("/v1/pa/k1")).status_code == 204  # still one pending key
        await assert_counts(flusher, {"pa": 10, "pb": 5, "pc": 1})
        s = (await api.get("/v1/stats")).json()
        assert s["pending_by_collection"] == {"pa": 10, "pb": 5, "pc": 1}
        assert s["pending_by_collection_exact"] is True

        # A dirty mark whose entry is gone is dropped by the claim.
        await flusher.redis.delete(flusher.keys.entry("pb", "k4"))
        batch = await wait_until(flusher.claim, timeout=5)
        assert len(batch.items) == 15
        await assert_counts(flusher, {"pa": 10, "pb": 4, "pc": 1})
        # A newer write while in flight: the key goes back to the dirty set on release.
        await put(api, "/v1/pa/k2", {"i": "newer"})
        await assert_counts(flusher, {"pa": 10, "pb": 4, "pc": 1})
        assert await flusher.flush_batch(batch)
        await assert_counts(flusher, {"pa": 1})
        assert (await api.get("/v1/stats")).json()["dead_letters"] == 1

        # An operator retry makes the dead letter pending again.
        assert (await api.post("/v1/dead-letters:retry")).json() == {"retried": 1}
        await assert_counts(flusher, {"pa": 1, "pc": 1})
        # A worker dies holding the batch: the next claim takes it over when the lease is
        # out (forced here) and the keys stay counted once.
        dead_worker = await wait_until(flusher.claim, timeout=5)
        flusher.held.discard(dead_worker.id)
        await flusher.redis.zadd(flusher.keys.leases, {dead_worker.id: 0})
        other = Flusher(flusher.redis, flusher.pg, settings, flusher.scripts)
        taken = await wait_until(other.claim, timeout=5)
        assert {i.member for i in taken.items} == {"pa:k2", "pc:p"}
        await assert_counts(flusher, {"pa": 1, "pc": 1})
        assert await other.flush_batch(taken)
        await assert_counts(flusher, {})
        assert not await flusher.redis.exists(flusher.keys.pending_counts)
        assert (await api.post("/v1/dead-letters:drop")).json() == {"dropped": 1}
        await assert_counts(flusher, {})

        # An explicit claim naming a key twice holds it once; a hand-back keeps it counted.
        await put(api, "/v1/pd/x", {"x": 1})
        held = await flusher.claim(["pd:x", "pd:x"])
        assert held is not None and len(held.items) == 1
        await assert_counts(flusher, {"pd": 1})
        await flusher.release(held, [], [])
        await assert_counts(flusher, {"pd": 1})


@pytest.mark.parametrize("kind", ["string", "hash"])
async def test_taken_over_and_handed_back_keys_are_dirty_from_the_batch_oldest_time(
    api: httpx.AsyncClient,
    flusher: Flusher,
    settings_factory: Callable[..., Settings],
    kind: str,
) -> None:
    """A batch's key lists its members (claim.lua: one msgpack string). What a take-over
    or a hand-back puts back is dirty from the batch's oldest dirty time, so it is due at
    once and the oldest pending age stays true; a batch a previous version claimed (a hash
    of member -> dirty time) is still read, each member back at its own time."""
    settings = settings_factory(write_delay_ms=0)
    k = flusher.keys
    for key in ("a", "b", "c"):
        await put(api, f"/v1/ho/{key}", {"k": key})
        await asyncio.sleep(0.005)  # distinct dirty times
    marks = dict(await flusher.redis.zrange(k.dirty, 0, -1, withscores=True))
    a = Flusher(flusher.redis, flusher.pg, settings, flusher.scripts)
    batch = await wait_until(a.claim, timeout=5)
    assert sorted(i.member for i in batch.items) == ["ho:a", "ho:b", "ho:c"]
    assert await flusher.redis.type(k.batch(batch.id)) == b"string"
    if kind == "hash":  # as a previous version left it
        await flusher.redis.delete(k.batch(batch.id))
        await flusher.redis.hset(k.batch(batch.id), mapping=marks)  # type: ignore[misc]
    oldest = min(marks.values())
    expected = marks if kind == "hash" else dict.fromkeys(marks, oldest)

    # Its worker dies: the lease runs out (forced), another claim takes the batch over.
    a.held.discard(batch.id)
    await flusher.redis.zadd(k.leases, {batch.id: 0})
    b = Flusher(flusher.redis, flusher.pg, settings, flusher.scripts)
    await b._take_over(0, [batch.id.encode()])
    assert dict(await flusher.redis.zrange(k.dirty, 0, -1, withscores=True)) == expected
    assert not await flusher.redis.exists(k.batch(batch.id))
    await assert_counts(flusher, {"ho": 3})

    # A hand-back (shutdown) puts them back the same way.
    again = await wait_until(b.claim, timeout=5)
    if kind == "hash":
        await flusher.redis.delete(k.batch(again.id))
        await flusher.redis.hset(k.batch(again.id), mapping=marks)  # type: ignore[misc]
    await b.hand_back_all()
    assert dict(await flusher.redis.zrange(k.dirty, 0, -1, withscores=True)) == expected
    await assert_counts(flusher, {"ho": 3})
    assert await b.drain_ready() == 3
    await assert_counts(flusher, {})


async def test_pending_counts_exact_through_a_chaotic_run(
    api: httpx.AsyncClient,
    flusher: Flusher,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
) -> None:
    """Concurrent PUT/PATCH/DELETE on overlapping keys, two flushers with small batches,
    one of which sometimes dies holding a batch (taken over when its lease is out), poison
    writes dead-lettered and retried by an operator: at every snapshot, and at the end, the
    kept counts equal the members per collection, and their sum is ``pending``."""
    rng = random.Random(7)
    small = settings_factory(batch_size=8)
    flushers = [Flusher(flusher.redis, flusher.pg, small, flusher.scripts) for _ in range(2)]
    stop = asyncio.Event()
    snapshots = 0

    async def writer(n: int) -> None:
        while not stop.is_set():
            path = f"/v1/chaos{rng.randrange(3)}/k{rng.randrange(30)}"
            what = rng.random()
            if what < 0.6:
                doc: dict[str, Any] = {"w": n, "r": rng.random()}
                if rng.random() < 0.05:
                    doc["poison"] = True
                await api.put(path, json=doc)
            elif what < 0.8:
                await api.patch(
                    path,
                    content=b'{"patched": true}',
                    headers={"Content-Type": "application/merge-patch+json"},
                )
            else:
                await api.delete(path)

    async def work(f: Flusher) -> None:
        while not stop.is_set():
            batch = await f.claim()
            if batch is None:
                await asyncio.sleep(0.01)
            elif rng.random() < 0.1:  # dies holding it: the lease runs out (forced)
                f.held.discard(batch.id)
                await f.redis.zadd(f.keys.leases, {batch.id: 0})
            else:
                await f.flush_batch(batch)

    async def operator() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.2)
            await api.post("/v1/dead-letters:retry")

    async def checker() -> None:
        nonlocal snapshots
        while not stop.is_set():
            await assert_counts(flusher)
            snapshots += 1
            await asyncio.sleep(0.02)

    async with poison_constraint(pg) as drop_constraint:
        tasks = [asyncio.create_task(writer(n)) for n in range(4)]
        tasks += [asyncio.create_task(work(f)) for f in flushers]
        tasks += [asyncio.create_task(operator()), asyncio.create_task(checker())]
        await asyncio.sleep(4)
        stop.set()
        await asyncio.gather(*tasks)
        assert snapshots > 20
        await drop_constraint()
        await api.post("/v1/dead-letters:retry")

        async def drained() -> dict[str, Any] | None:
            await flusher.drain_ready()  # (its claims take over the abandoned batches)
            s: dict[str, Any] = (await api.get("/v1/stats")).json()
            return s if s["pending"] == 0 and s["dead_letters"] == 0 else None

        s = await wait_until(drained, timeout=20)
    await assert_counts(flusher, {})
    assert s["pending_by_collection"] == {} and s["pending_by_collection_exact"] is True


async def test_stats_reads_the_kept_counts_not_the_members(
    api: httpx.AsyncClient, flusher: Flusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(3):
        await put(api, f"/v1/pe/k{i}", i)

    async def no_scan(*args: Any) -> dict[str, Any]:
        raise AssertionError("read the queue's members")

    with monkeypatch.context() as m:
        m.setattr(stats, "_count_members", no_scan)
        s = (await api.get("/v1/stats")).json()
    assert s["pending_by_collection"] == {"pe": 3} and s["pending_by_collection_exact"] is True
    # A queue the counts do not cover (left by an older version): the members are counted.
    await flusher.redis.delete(flusher.keys.pending_counts)
    s = (await api.get("/v1/stats")).json()
    assert s["pending_by_collection"] == {"pe": 3} and s["pending_by_collection_exact"] is True


async def test_worker_with_a_slow_clock_counts_as_live(
    api: httpx.AsyncClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats and /v1/stats both use Redis' clock: a worker whose clock is an hour
    behind the API's is still a live worker."""
    slow = types.SimpleNamespace(time=lambda: time.time() - 3600)
    monkeypatch.setattr(worker_settings_module, "time", slow, raising=False)

    async def live() -> bool:
        s = (await api.get("/v1/stats")).json()
        return bool(s["workers"] == 1 and 0 <= next(iter(s["worker_heartbeats"].values())) < 60)

    async with running_worker(settings):
        await wait_until(live, timeout=10)


async def test_sweeps_keep_their_state_across_arq_job_contexts(
    flusher: Flusher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """arq runs each cron sweep with a copy of the worker's ctx: what a sweep keeps (its
    count, which paces the hourly tombstone collection, and the key filter build, which
    shutdown must wait for) lives in an object the copies share. Set on the copy, the
    build task was never waited for (a worker connection left open at shutdown) and
    tombstones were collected at every sweep."""
    collections: list[int] = []

    async def gc(pool: Any, days: int) -> int:
        collections.append(days)
        return 0

    monkeypatch.setattr(repository, "gc_tombstones", gc)
    ctx: dict[str, Any] = {
        "flusher": flusher,
        "flush_lock": asyncio.Lock(),
        "sweep_state": flush_jobs.SweepState(),
    }
    for _ in range(3):
        await flush_jobs.sweep({**ctx, "job_id": "cron:sweep"})  # as arq calls it
    state = ctx["sweep_state"]
    assert state.sweeps == 3 and len(collections) == 1
    assert state.key_filter_build is not None
    await state.key_filter_build
    run_id = await server_run_id(flusher.redis)
    assert await incomplete(flusher.redis, flusher.shards, flusher.key_filter, run_id) == []
