"""Acknowledged means replicated, when asked (REDIS_MIN_REPLICAS): every write is answered
only once that many replicas hold it (WAIT in the write's own round trip), else 503
``replicas_unconfirmed`` that says the primary has it; and the flush path stays correct
when a failover loses claim, lease or release state (versions fence every statement).

Each replication test starts its own primary + replica (throwaway ``redis-server``s; the
shared Redis is never reconfigured). A replica that does not acknowledge is a SIGSTOPped
one: it neither reads the replication stream nor answers WAIT's GETACK."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import pytest
from redis.asyncio import Redis

from service.adapters.postgres import PgPool
from service.adapters.redis import create_redis
from service.config import Settings
from service.core.flusher import Flusher
from service.core.redis_keys import Keys, member
from service.core.scripts import Scripts
from service.dev.embedded import RedisServer
from tests.conftest import running_api, running_worker, wait_drained, wait_until


@dataclass
class Pair:
    primary: RedisServer
    replica: RedisServer
    p: Redis
    r: Redis


async def _confirms(primary: Redis) -> bool:
    """Does the replica acknowledge a write now (it is synced and answering)?"""
    async with primary.pipeline(transaction=False) as pipe:
        pipe.set("replication-probe", "1")
        pipe.wait(1, 100)
        replicas: int = (await pipe.execute())[1]
    return replicas >= 1


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    # No 5 s wait for more replicas before the first full sync (Redis' default).
    primary = RedisServer(
        tmp_path / "primary", appendonly=False, extra_args=["--repl-diskless-sync-delay", "0"]
    )
    replica = RedisServer(
        tmp_path / "replica",
        appendonly=False,
        extra_args=["--replicaof", "127.0.0.1", str(primary.port)],
    )
    await asyncio.to_thread(primary.start)
    p = Redis.from_url(primary.url)
    r = Redis.from_url(replica.url)
    try:
        await asyncio.to_thread(replica.start)
        await wait_until(lambda: _confirms(p), timeout=15)
        await p.delete("replication-probe")
        yield Pair(primary, replica, p, r)
    finally:
        await p.aclose()
        await r.aclose()
        _resume(replica)
        await asyncio.to_thread(replica.stop)
        await asyncio.to_thread(primary.stop)


def _resume(server: RedisServer) -> None:
    if server.pid is not None:
        with contextlib.suppress(psutil.Error):
            psutil.Process(server.pid).resume()


@contextlib.contextmanager
def paused(server: RedisServer) -> Iterator[None]:
    """SIGSTOP ``server`` (a replica that acknowledges nothing), SIGCONT on the way out."""
    assert server.pid is not None
    psutil.Process(server.pid).suspend()
    try:
        yield
    finally:
        _resume(server)


@pytest.fixture
def c() -> str:
    return f"rep{uuid.uuid4().hex[:10]}"


def _etag(r: httpx.Response) -> int:
    return int(r.headers["etag"].strip('"'))


async def _entry(client: Redis, settings: Settings, c: str, key: str) -> tuple[int | None, bool]:
    """(version, deleted) of a record's cache entry on one server, read once."""
    v, t = await client.hmget(Keys(settings.redis_prefix).entry(c, key), ["v", "t"])  # type: ignore[misc]
    return (None if v is None else int(v)), t == b"1"


def _assert_unconfirmed(r: httpx.Response | dict[str, Any], version: int | None = None) -> int:
    """A 503 replicas_unconfirmed answer (a response, or a batch operation's result) that
    says the primary accepted the write; returns the version it names."""
    if isinstance(r, httpx.Response):
        assert r.status_code == 503, (r.status_code, r.text)
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        named = _etag(r)
    else:
        assert r["status"] == 503, r
        error = r["error"]
        named = int(r["version"])
    assert error["code"] == "replicas_unconfirmed", error
    message = error["message"]
    assert "accepted" in message and str(named) in message, message
    assert "If-Match" in message and "failover" in message, message
    if version is not None:
        assert named == version
    return named


# -- acknowledged means replicated -----------------------------------------------------


async def test_every_kind_of_write_is_on_the_replica_when_acknowledged(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    """PUT (new key: the MISS path; cached key), PATCH, DELETE and a batch: each 2xx means
    the replica holds that version, read right after the answer (no polling)."""
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=1, redis_replica_timeout_ms=3000
    )
    async with running_api(settings) as api:
        warnings = (await api.get("/readyz")).json().get("warnings", [])
        assert not any("REDIS_MIN_REPLICAS" in w for w in warnings), warnings
        for i in range(10):
            r = await api.put(f"/v1/{c}/k{i}", json={"i": i})
            assert r.status_code == 201, r.text
            assert await _entry(pair.r, settings, c, f"k{i}") == (_etag(r), False)
        r = await api.put(f"/v1/{c}/k0", json={"i": 100})
        assert r.status_code == 200, r.text
        assert await _entry(pair.r, settings, c, "k0") == (_etag(r), False)
        r = await api.patch(
            f"/v1/{c}/k1",
            content=b'{"p": 1}',
            headers={"Content-Type": "application/merge-patch+json"},
        )
        assert r.status_code == 200, r.text
        assert await _entry(pair.r, settings, c, "k1") == (_etag(r), False)
        r = await api.delete(f"/v1/{c}/k2")
        assert r.status_code == 204, r.text
        assert await _entry(pair.r, settings, c, "k2") == (_etag(r), True)

        ops: list[dict[str, Any]] = [
            {"op": "put", "collection": c, "key": "k3", "document": {"b": 1}},  # cached
            {"op": "delete", "collection": c, "key": "k4"},  # cached
            {"op": "put", "collection": c, "key": "new", "document": {"b": 2}},  # MISS
            {"op": "patch", "collection": c, "key": "k5", "patch": {"b": 3}},
        ]
        r = await api.post("/v1/batch", json={"operations": ops})
        results = r.json()["results"]
        assert [x["status"] for x in results] == [200, 204, 201, 200], results
        for op, res in zip(ops, results, strict=True):
            deleted = op["op"] == "delete"
            assert await _entry(pair.r, settings, c, op["key"]) == (res["version"], deleted)


async def test_the_answer_waits_until_the_replica_holds_the_write(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    """While the replica is stopped a write is not answered; once it runs again, the
    answer comes and the replica has the write. (Without WAIT the answer would come at
    once, from the primary alone.)"""
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=1, redis_replica_timeout_ms=4000
    )
    async with running_api(settings) as api:
        assert (await api.put(f"/v1/{c}/k", json={"a": 0})).status_code == 201
        with paused(pair.replica):
            task = asyncio.create_task(api.put(f"/v1/{c}/k", json={"a": 1}))
            done, _ = await asyncio.wait({task}, timeout=0.5)
            assert not done, "answered while no replica held the write"
        r = await task
        assert r.status_code == 200, r.text
        assert await _entry(pair.r, settings, c, "k") == (_etag(r), False)


async def test_a_write_the_replica_does_not_confirm_answers_503_and_stays_on_the_primary(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    timeout_ms = 400
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=1, redis_replica_timeout_ms=timeout_ms
    )
    async with running_api(settings) as api:
        first = await api.put(f"/v1/{c}/k", json={"a": 0})
        assert first.status_code == 201
        assert (await api.put(f"/v1/{c}/gone", json={"a": 0})).status_code == 201
        before = first.headers["etag"]
        with paused(pair.replica):
            started = time.monotonic()
            r = await api.put(f"/v1/{c}/k", json={"a": 1}, headers={"If-Match": before})
            elapsed = time.monotonic() - started
            accepted = _assert_unconfirmed(r)
            assert elapsed < timeout_ms / 1000 + 1.5, elapsed
            # The primary has it, and the API reads it back (read your writes).
            assert await _entry(pair.p, settings, c, "k") == (accepted, False)
            got = await api.get(f"/v1/{c}/k")
            assert got.json() == {"a": 1} and _etag(got) == accepted

            r = await api.patch(
                f"/v1/{c}/k",
                content=b'{"b": 2}',
                headers={"Content-Type": "application/merge-patch+json"},
            )
            patched = _assert_unconfirmed(r)
            assert await _entry(pair.p, settings, c, "k") == (patched, False)
            r = await api.delete(f"/v1/{c}/gone")
            deleted = _assert_unconfirmed(r)
            assert await _entry(pair.p, settings, c, "gone") == (deleted, True)
        # The replica is back: a retry with the same If-Match is safe, 412 names the
        # version now in place.
        retry = await api.put(f"/v1/{c}/k", json={"a": 1}, headers={"If-Match": before})
        assert retry.status_code == 412, retry.text
        assert _etag(retry) == patched
        assert (await api.get(f"/v1/{c}/k")).json() == {"a": 1, "b": 2}


async def test_more_replicas_required_than_there_are_answers_503(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=2, redis_replica_timeout_ms=300
    )
    async with running_api(settings) as api:
        # Said at start, and on /readyz: every write will answer 503.
        warnings = (await api.get("/readyz")).json().get("warnings", [])
        assert any("REDIS_MIN_REPLICAS is 2" in w and "1 connected" in w for w in warnings)
        r = await api.put(f"/v1/{c}/k", json={"a": 1})
        version = _assert_unconfirmed(r)
        assert "of 2 required replicas" in r.json()["error"]["message"]
        assert await _entry(pair.p, settings, c, "k") == (version, False)
        # The one replica has it all the same.
        await wait_until(lambda: _has(pair.r, settings, c, "k", version), timeout=5)


async def _has(client: Redis, settings: Settings, c: str, key: str, version: int) -> bool:
    return (await _entry(client, settings, c, key))[0] == version


async def test_a_batch_round_the_replica_does_not_confirm_answers_503_per_write(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    """Every write of the round gets the 503 as its own result, with the version the
    primary gave it; reads and writes that wrote nothing (412) keep their answers."""
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=1, redis_replica_timeout_ms=1000
    )
    async with running_api(settings) as api:
        for key in ("a", "b", "g", "p", "q"):
            assert (await api.put(f"/v1/{c}/{key}", json={"k": key})).status_code == 201
        ops: list[dict[str, Any]] = [
            {"op": "put", "collection": c, "key": "a", "document": {"n": 1}},
            {"op": "delete", "collection": c, "key": "b"},
            {"op": "put", "collection": c, "key": "new", "document": {"n": 1}},
            {"op": "get", "collection": c, "key": "g"},
            {"op": "put", "collection": c, "key": "q", "document": {}, "if_match": '"1"'},
            {"op": "patch", "collection": c, "key": "p", "patch": {"n": 1}},
            {"op": "put", "collection": c, "key": "a", "document": {"n": 2}},  # round 2
        ]
        with paused(pair.replica):
            r = await api.post("/v1/batch", json={"operations": ops})
        assert r.status_code == 200, r.text
        results = r.json()["results"]
        assert results[3]["status"] == 200 and results[3]["document"] == {"k": "g"}
        assert results[4]["status"] == 412, results[4]
        for i in (0, 1, 2, 5, 6):
            version = _assert_unconfirmed(results[i])
            deleted = ops[i]["op"] == "delete"
            if i != 0:  # a's round-1 write was replaced by its round-2 write
                assert await _entry(pair.p, settings, c, ops[i]["key"]) == (version, deleted)
        assert results[6]["version"] > results[0]["version"]

        # Replica back: the same batch is acknowledged (b is gone now: 404; q still 412).
        r = await api.post("/v1/batch", json={"operations": ops})
        statuses = [x["status"] for x in r.json()["results"]]
        assert statuses == [200, 404, 200, 200, 412, 200, 200], r.text


async def test_write_through_waits_for_the_replica_and_postgres(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=1, redis_replica_timeout_ms=1000
    )
    through = {"Write-Mode": "through"}
    async with running_api(settings) as api:
        r = await api.put(f"/v1/{c}/k", json={"a": 1}, headers=through)
        assert r.status_code == 201, r.text
        assert await _entry(pair.r, settings, c, "k") == (_etag(r), False)
        row = await pg.fetchrow(
            "SELECT value::text, version FROM records WHERE collection = $1 AND key = 'k'", c
        )
        assert row is not None and (json.loads(row[0]), row[1]) == ({"a": 1}, _etag(r))
        with paused(pair.replica):
            r = await api.put(f"/v1/{c}/k", json={"a": 2}, headers=through)
            version = _assert_unconfirmed(r)
            assert await _entry(pair.p, settings, c, "k") == (version, False)


async def test_without_min_replicas_a_write_sends_no_wait(
    pair: Pair, settings_factory: Callable[..., Settings], pg: asyncpg.Connection, c: str
) -> None:
    """The default (0): one EVALSHA per write of a cached key, nothing else is added; with
    1, one WAIT per write (in the same pipeline) and still one EVALSHA."""
    for replicas, waits in ((0, 0), (1, 20)):
        settings = settings_factory(redis_url=pair.primary.url, redis_min_replicas=replicas)
        async with running_api(settings) as api:
            assert (await api.put(f"/v1/{c}/k", json={"n": -1})).status_code in (200, 201)
            await pair.p.config_resetstat()
            for n in range(20):
                assert (await api.put(f"/v1/{c}/k", json={"n": n})).status_code == 200
            stats: dict[str, Any] = await pair.p.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 20, stats
        assert stats.get("cmdstat_wait", {"calls": 0})["calls"] == waits, stats


@pytest.mark.parametrize("replicas", [0, 1])
async def test_acknowledged_writes_survive_the_loss_of_the_primary(
    pair: Pair,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    c: str,
    replicas: int,
) -> None:
    """Eight clients PUT; the replica stalls (SIGSTOP) and loses its link for a while, then
    the primary is SIGKILLed and the replica promoted; a worker drains it. With REDIS_MIN_REPLICAS=1
    every acknowledged write reaches Postgres at its version or a newer one; with 0 the
    writes acknowledged while the replica stalled are lost (the documented window)."""
    settings = settings_factory(
        redis_url=pair.primary.url, redis_min_replicas=replicas, redis_replica_timeout_ms=200
    )
    acked: dict[str, int] = {}
    stalled = asyncio.Event()
    during_stall = 0

    async def client(api: httpx.AsyncClient, n: int) -> None:
        nonlocal during_stall
        for i in range(100_000):
            key = f"k{n}-{i % 40}"
            try:
                r = await api.put(f"/v1/{c}/{key}", json={"n": n, "i": i})
            except Exception:  # the primary is gone (in-process transport re-raises)
                return
            if r.status_code in (200, 201):
                acked[key] = _etag(r)
                during_stall += stalled.is_set()
            elif r.json()["error"]["code"] == "redis_unavailable":
                return

    async with running_api(settings) as api:
        clients = [asyncio.create_task(client(api, n)) for n in range(8)]
        await wait_until(lambda: len(acked) >= 200, timeout=20)
        with paused(pair.replica):
            # Cut the replica off: what the primary accepts from now on reaches no replica
            # (a stalled but connected one would still get it from the kernel's buffers).
            await pair.p.client_kill_filter(_type="slave")
            stalled.set()
            await asyncio.sleep(0.5)  # the stall under test, not a synchronisation
            await asyncio.to_thread(pair.primary.kill)
            await asyncio.gather(*clients)
    await pair.r.replicaof("NO", "ONE")  # the failover: the replica becomes the primary
    promoted = settings_factory(redis_url=pair.replica.url)
    async with running_api(promoted) as api, running_worker(promoted):
        await wait_drained(api, timeout=30)
    stored = {
        r["key"]: int(r["version"])
        for r in await pg.fetch("SELECT key, version FROM records WHERE collection = $1", c)
    }
    lost = {k: v for k, v in acked.items() if stored.get(k, 0) < v}
    if replicas:
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged writes lost"
        assert during_stall == 0
    else:
        assert during_stall > 0 and lost, (during_stall, len(lost))


# -- a failover that loses flush state ------------------------------------------------


@pytest.fixture
async def flushers(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> AsyncIterator[tuple[Flusher, Flusher]]:
    """Two flushers (two workers) on the test's prefix of the shared Redis."""
    made: list[tuple[Any, PgPool]] = []
    out = []
    for name in ("a", "b"):
        settings = settings_factory(lease_seconds=0.3)
        client = create_redis(f"test-flusher-{name}", settings)
        pool = PgPool(f"test-flusher-{name}", settings)
        made.append((client, pool))
        out.append(Flusher(client, pool, settings, Scripts.register(client)))
    yield out[0], out[1]
    for client, pool in made:
        await pool.close()
        await client.aclose(close_connection_pool=True)


async def _snapshot(redis: Any, names: list[str]) -> dict[str, bytes | None]:
    return {name: await redis.dump(name) for name in names}


async def _restore(redis: Any, snapshot: dict[str, bytes | None], extra: list[str]) -> None:
    """Put ``snapshot``'s keys back as they were (a lagging replica promoted), and drop
    ``extra`` keys it never had."""
    async with redis.pipeline(transaction=True) as pipe:
        for name, blob in snapshot.items():
            pipe.delete(name)
            if blob is not None:
                pipe.restore(name, 0, blob)
        for name in extra:
            pipe.delete(name)
        await pipe.execute()


async def _rows(pg: asyncpg.Connection, c: str) -> dict[str, tuple[Any, int]]:
    found = await pg.fetch(
        "SELECT key, value::text AS value, version FROM records WHERE collection = $1", c
    )
    return {r["key"]: (json.loads(r["value"]), int(r["version"])) for r in found}


QUEUE_KEYS = ("dirty", "inflight", "leases", "batch_age", "pending_counts")


async def test_a_failover_that_lost_a_claim_keeps_the_newest_versions(
    api: httpx.AsyncClient,
    redis: Any,
    settings: Settings,
    flushers: tuple[Flusher, Flusher],
    pg: asyncpg.Connection,
    c: str,
) -> None:
    """Flusher A claims a batch; the primary dies and a replica that never saw the claim
    takes over (the keys are dirty again, A's batch and lease unknown). Newer writes land,
    flusher B claims and flushes them, then A commits and releases its old batch late:
    Postgres keeps the newest versions, a deleted key stays deleted, nothing stays pending."""
    a, b = flushers
    k = Keys(settings.redis_prefix)
    v1: dict[str, int] = {}
    for key in ("put", "del", "same", "putdel"):
        r = await api.put(f"/v1/{c}/{key}", json={"v": 1, "k": key})
        v1[key] = _etag(r)
    members = [member(c, key) for key in v1]
    queue = [getattr(k, name) for name in QUEUE_KEYS]
    before = await _snapshot(redis, queue)

    old = await a.claim(members)
    assert old is not None and len(old.items) == 4
    await _restore(redis, before, [k.batch(old.id)])  # the failover

    latest: dict[str, int] = {}
    r = await api.put(f"/v1/{c}/put", json={"v": 2})
    latest["put"] = _etag(r)
    assert (await api.delete(f"/v1/{c}/del")).status_code == 204
    assert (await api.put(f"/v1/{c}/putdel", json={"v": 2})).status_code == 200
    assert (await api.delete(f"/v1/{c}/putdel")).status_code == 204

    new = await b.claim(members)
    assert new is not None and len(new.items) == 4
    assert await b.flush_batch(new)
    assert await _rows(pg, c) == {
        "put": ({"v": 2}, latest["put"]),
        "same": ({"v": 1, "k": "same"}, v1["same"]),
    }

    assert await a.flush_batch(old)  # late: its versions are older than what is committed
    assert await _rows(pg, c) == {
        "put": ({"v": 2}, latest["put"]),
        "same": ({"v": 1, "k": "same"}, v1["same"]),
    }
    stats = await wait_drained(api, timeout=5)
    assert stats["dead_letters"] == 0
    assert (await api.get(f"/v1/{c}/del")).status_code == 404
    assert (await api.get(f"/v1/{c}/put")).json() == {"v": 2}


async def test_a_failover_that_lost_a_release_flushes_again_harmlessly(
    api: httpx.AsyncClient,
    redis: Any,
    settings: Settings,
    flushers: tuple[Flusher, Flusher],
    pg: asyncpg.Connection,
    c: str,
) -> None:
    """Flusher A commits and releases a batch; the replica that takes over saw the claim
    but not the release (the keys are in A's batch, under A's lease, entries not marked
    persisted). The lease runs out, B takes the batch over with a newer write among it and
    flushes again: the same versions rewrite nothing older, the newer one wins."""
    a, b = flushers
    k = Keys(settings.redis_prefix)
    v1: dict[str, int] = {}
    for key in ("put", "del", "same"):
        v1[key] = _etag(await api.put(f"/v1/{c}/{key}", json={"v": 1}))
    assert (await api.delete(f"/v1/{c}/del")).status_code == 204
    members = [member(c, key) for key in v1]
    entries = [k.entry(c, key) for key in v1]

    batch = await a.claim(members)
    assert batch is not None
    state = [*(getattr(k, name) for name in QUEUE_KEYS), k.batch(batch.id), *entries]
    claimed = await _snapshot(redis, state)
    assert await a.flush_batch(batch)
    await _restore(redis, claimed, [])  # the failover: the release is lost

    newer = _etag(await api.put(f"/v1/{c}/put", json={"v": 3}))
    # A's lease (0.3 s) runs out on the new primary's clock; B takes the batch over.
    taken = await wait_until(lambda: b.claim(), timeout=10)
    assert {i.member for i in taken.items} == set(members)
    assert await b.flush_batch(taken)
    assert await _rows(pg, c) == {"put": ({"v": 3}, newer), "same": ({"v": 1}, v1["same"])}
    stats = await wait_drained(api, timeout=5)
    assert stats["dead_letters"] == 0
    assert (await api.get(f"/v1/{c}/del")).status_code == 404
