"""Redis Cluster under faults (issue 10's chaos list). Each test forms a Cluster of its own
(three primaries with a replica each, service/dev/cluster.py) in a temporary directory and
runs real ``wbcache serve`` / ``wbcache worker`` processes on it under the mixed write load
of tests/integration/load.py, whose acknowledged versions are compared with Postgres after
a drain:

* the primary holding the busiest shard SIGKILLed mid-load, with writes pending on it,
  its replica in sync or cut off for a few hundred writes first: with REDIS_MIN_REPLICAS=1
  no acknowledged write is lost, at its version; with 0 the acknowledged writes the
  promoted replica never received are counted and reported (the documented window,
  docs/scaling.md); either way every answer is a 2xx or a 503 with Retry-After, and the
  API and workers (arq's, or polling ones) recover without a restart;
* slot ranges holding shards moved to another primary mid-load (MIGRATE; clients follow
  ASK, TRYAGAIN and MOVED): nothing lost, no 5xx but a bounded number of 503s, and the
  shards' keys live on the new primary afterwards;
* a Cluster without ARQ_REDIS_URL: the worker polls the shards, drains them, shows in
  ``wbcache status``, and stops on SIGTERM.

Each prints its numbers (run with ``-s``; the SIGKILL tests a line "LOST n of m
acknowledged writes") and writes them to /tmp/wbcache-cluster-chaos/<case>.json. Postgres
is the shared test database; the arq wake-ups go to the standalone test Redis (under the
test's own prefix)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
import redis as sync_redis

from service.adapters.redis import AnyRedis, close_redis, connect_redis
from service.config import Settings
from service.core.redis_keys import member
from service.core.shards import Shards
from service.dev.cluster import ClusterTopology, slot_of
from service.dev.redis_server import RedisServer
from service.dev.server import HOST
from tests.conftest import wait_until
from tests.integration.load import (
    Load,
    account_failover,
    check_after_failover,
    take_gone,
)
from tests.support.procs import ApiProc, Proc, WorkerProc, wbcache_argv
from tests.support.servers import TestServers as Servers
from tests.support.servers import data_dir

pytestmark = pytest.mark.chaos

Procs = Callable[..., ApiProc | WorkerProc]

SHARDS = 16  # REDIS_SHARDS: the default on a Cluster, said out loud
REPORTS = Path("/tmp/wbcache-cluster-chaos")  # the numbers of each run, for quoting


# --------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _cluster(prefix: str, procs: Procs) -> Iterator[tuple[ClusterTopology, Procs]]:
    """Three primaries with a replica each (failover in ~2-3 s: node timeout 1 s), and a
    ``procs`` whose processes are stopped before the Cluster is (the fixture would stop
    them after it, when they only log that it is gone)."""
    started: list[Proc] = []

    def start(kind: str, **env: str) -> ApiProc | WorkerProc:
        p = procs(kind, **env)
        started.append(p)
        return p

    with data_dir(prefix) as base:
        topology = ClusterTopology(base, primaries=3, replicas_per_primary=1)
        topology.start()
        try:
            yield topology, start
        finally:
            for p in started:
                p.stop()
            topology.stop()


def _env(cluster: ClusterTopology, arq_redis_url: str, **extra: str) -> dict[str, str]:
    """A service process's environment on ``cluster`` (``procs`` adds Postgres and the
    prefix). ``arq_redis_url`` "" leaves ARQ_REDIS_URL unset: workers poll."""
    return {
        "redis_url": cluster.url,
        "REDIS_SHARDS": str(SHARDS),
        "ARQ_REDIS_URL": arq_redis_url,
        **extra,
    }


def _arq_url(servers: Servers) -> str:
    """The standalone Redis for arq's wake-ups: the test Redis (under the test's prefix)."""
    return servers.arq_redis_url or servers.redis_url


def _api(procs: Procs, **env: str) -> ApiProc:
    p = procs("api", **env)
    assert isinstance(p, ApiProc)
    return p


def _alive(p: Proc) -> bool:
    return p.popen is not None and p.popen.poll() is None


def _logs(*ps: Proc) -> str:
    return "\n".join(f"--- {p.log.name}:\n{p.output()[-2500:]}" for p in ps)


def _collection() -> str:
    return f"cluster-{uuid.uuid4().hex[:8]}"


def _report(name: str, numbers: dict[str, Any]) -> None:
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / f"{name}.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")


@contextlib.asynccontextmanager
async def _client(
    settings_factory: Callable[..., Settings], cluster: ClusterTopology
) -> AsyncIterator[AnyRedis]:
    """The test's own Cluster client (the service's ``connect_redis``)."""
    client = connect_redis("test", settings_factory(redis_url=cluster.url, redis_shards=SHARDS))
    try:
        yield client
    finally:
        await close_redis(client)


async def _pending_by_shard(client: AnyRedis, shards: Shards) -> list[int]:
    """Each shard's pending count (dirty + in flight), one pipeline (a round trip a node)."""
    async with client.pipeline() as pipe:
        for k in shards:
            pipe.zcard(k.dirty)
            pipe.hlen(k.inflight)
        counts: list[int] = await pipe.execute()
    return [counts[2 * i] + counts[2 * i + 1] for i in range(len(shards))]


def _shard_slot(shards: Shards, shard: int) -> int:
    """The hash slot all of ``shard``'s keys live in (its tag's)."""
    return slot_of(shards[shard].dirty)


def _ask(node: RedisServer, *command: Any) -> Any:
    client = sync_redis.Redis(host=HOST, port=node.port, socket_timeout=5)
    try:
        return client.execute_command(*command)  # type: ignore[no-untyped-call]
    finally:
        client.close()


def _entry_versions(node: RedisServer, entries: dict[str, str]) -> dict[str, int]:
    """Each record's entry version on the replica ``node`` (0: no entry), ``entries`` being
    record key -> entry key, read in one pipeline bracketed by ROLE, which must say replica
    both times (nothing promoted it in between, so nothing newer was written there)."""
    client = sync_redis.Redis(host=HOST, port=node.port, socket_timeout=5)
    try:
        client.execute_command("READONLY")  # type: ignore[no-untyped-call]
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("ROLE")  # type: ignore[no-untyped-call]
        for name in entries.values():
            pipe.hget(name, "v")
        pipe.execute_command("ROLE")  # type: ignore[no-untyped-call]
        answers = pipe.execute()
    finally:
        client.close()
    assert answers[0][0] == answers[-1][0] == b"slave", (answers[0], answers[-1])
    versions = answers[1:-1]
    return {key: int(v) if v else 0 for key, v in zip(entries, versions, strict=True)}


def _in_sync(cluster: ClusterTopology, primary: RedisServer) -> bool:
    """Has ``primary`` a replica whose link is up (a restarted node that rejoined)?"""
    for replica in cluster.replicas_of(primary):
        client = sync_redis.Redis(host=HOST, port=replica.port, socket_timeout=5)
        try:
            info = cast(dict[str, Any], client.info("replication"))
        finally:
            client.close()
        if info.get("master_link_status") == "up":
            return True
    return False


def _probe_key(collection: str, shards: Shards, shard: int) -> str:
    """A key of ``collection`` that lives in ``shard``."""
    return next(
        f"p{i}" for i in range(100_000) if shards.index(member(collection, f"p{i}")) == shard
    )


def _cut_off(primary: RedisServer, replica: RedisServer) -> None:
    """Drop the replica's link and keep it down: its next handshake sends a password the
    primary refuses (it has none), so it stays behind until its masterauth is reset."""
    _ask(replica, "CONFIG", "SET", "masterauth", "not-the-password")
    _ask(primary, "CLIENT", "KILL", "TYPE", "replica")
    deadline = time.monotonic() + 10
    client = sync_redis.Redis(host=HOST, port=replica.port, socket_timeout=5)
    try:
        while cast(dict[str, Any], client.info("replication"))["master_link_status"] != "down":
            assert time.monotonic() < deadline, "the replica's link did not go down"
            time.sleep(0.01)
    finally:
        client.close()


# --------------------------------------------------------------------------- SIGKILL


@pytest.mark.parametrize("min_replicas", [1, 0], ids=lambda n: f"min_replicas={n}")
@pytest.mark.parametrize("link", ["in-sync", "cut-off"])
async def test_busiest_shard_primary_sigkill_under_load(
    procs: Procs,
    servers: Servers,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    prefix: str,
    min_replicas: int,
    link: str,
) -> None:
    """Sixteen clients write over 200 keys (WRITE_DELAY_MS=1000: about a second of writes
    is pending in Redis at any time); the primary holding the shard with the most pending
    keys is SIGKILLed, the replica promoted by the Cluster, the killed node started again
    (it rejoins as the new primary's replica, as an operator would restart it); the load
    goes on throughout, through one API process and two workers that are never restarted.

    ``in-sync``: the replica is in sync at the kill. With REDIS_MIN_REPLICAS=1 a write is
    acknowledged only once the replica holds it, so the promoted replica has every
    acknowledged write: none is lost. With 0 the writes acknowledged just before the kill
    that had not reached the replica are gone with the old primary: counted and reported
    ("LOST n of m acknowledged writes"), not asserted (on loopback the lag is short:
    usually none).

    ``cut-off``: the replica's link drops first (a network blip: the primary closes it and
    the replica cannot authenticate again) and the primary goes on for a few hundred
    writes before it dies: the loss window of asynchronous replication, made visible.
    With REDIS_MIN_REPLICAS=1 the writes to the cut-off primary answer 503
    replicas_unconfirmed (not acknowledged) and none acknowledged is lost; with 0 they
    are acknowledged, and those the promoted replica never received are lost."""
    with _cluster(f"wbcache-cluster-{link}-", procs) as (cluster, on_cluster):
        await _busiest_shard_primary_sigkill(
            cluster, on_cluster, servers, settings_factory, pg, prefix, min_replicas, link
        )


async def _busiest_shard_primary_sigkill(
    cluster: ClusterTopology,
    procs: Procs,
    servers: Servers,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    prefix: str,
    min_replicas: int,
    link: str,
    arq_redis_url: str | None = None,
) -> None:
    started = time.monotonic()
    env = _env(
        cluster,
        _arq_url(servers) if arq_redis_url is None else arq_redis_url,
        WRITE_DELAY_MS="1000",
        REDIS_MIN_REPLICAS=str(min_replicas),
        REDIS_REPLICA_TIMEOUT_MS="500",
    )
    api = _api(procs, **env)
    workers = [procs("worker", **env), procs("worker", **env)]
    shards = Shards(prefix, SHARDS, tagged=True)
    load = Load([api.url], _collection(), keys=200, clients=16, retries=3, retry_delay=0.3)
    probe_collection = f"{load.collection}-probe"
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop=stop, max_seconds=90))
    probes: list[tuple[float, int, str | None, str]] = []  # time, status, Retry-After, code
    try:
        async with _client(settings_factory, cluster) as client:
            await load.wait_acked(1000)
            pending = await _pending_by_shard(client, shards)
        busiest = max(range(SHARDS), key=lambda s: pending[s])
        old = await asyncio.to_thread(cluster.primary_for_slot, _shard_slot(shards, busiest))
        (replica,) = await asyncio.to_thread(cluster.replicas_of, old)
        old_slots = set(await asyncio.to_thread(cluster.slots_of, old))
        killed_shards = [s for s in range(SHARDS) if _shard_slot(shards, s) in old_slots]
        pending_on_old = sum(pending[s] for s in killed_shards)
        # The replica's entries are read right after the kill, before the Cluster marks
        # the primary failed (after the 1 s node timeout): let it answer reads even then.
        await asyncio.to_thread(
            _ask, replica, "CONFIG", "SET", "cluster-allow-reads-when-down", "yes"
        )
        entries = {
            key: shards.for_record(load.collection, key).entry(load.collection, key)
            for key in load.keys
            if shards.index(member(load.collection, key)) in killed_shards
        }
        if link == "cut-off":
            await asyncio.to_thread(_cut_off, old, replica)
            acked, unknown = load.acked, load.unknown
            # Writes go on while no replica listens (or, with REDIS_MIN_REPLICAS, fail).
            await wait_until(
                lambda: load.acked >= acked + 300 or load.unknown >= unknown + 50, timeout=20
            )

        await asyncio.to_thread(cluster.kill, old)
        killed_at = time.monotonic()
        acked_at_kill = load.acked
        held = await asyncio.to_thread(_entry_versions, replica, entries)
        if link == "cut-off":
            await asyncio.to_thread(_ask, replica, "CONFIG", "SET", "masterauth", "")

        def failover() -> tuple[RedisServer, float]:
            return cluster.wait_for_failover(old, 30), time.monotonic()

        failing_over = asyncio.create_task(asyncio.to_thread(failover))
        probe_key = _probe_key(probe_collection, shards, busiest)
        failed_over_at = restarted_at = 0.0
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            # Writes to the killed shard, until one is acknowledged after the failover and
            # the old node's restart (with REDIS_MIN_REPLICAS=1, the shard needs a replica).
            while True:
                r = await http.put(f"/v1/{probe_collection}/{probe_key}", json=len(probes))
                code = r.json()["error"]["code"] if r.status_code >= 400 else ""
                probes.append((time.monotonic(), r.status_code, r.headers.get("retry-after"), code))
                if failing_over.done() and not restarted_at:
                    new, failed_over_at = await failing_over
                    await asyncio.to_thread(old.start)
                    restarted_at = time.monotonic()
                if restarted_at and r.status_code in (200, 201):
                    break
                assert time.monotonic() - killed_at < 45, "no write accepted 45 s after the kill"
                await asyncio.sleep(0.05)
        recovered_at = probes[-1][0]
        await wait_until(lambda: asyncio.to_thread(_in_sync, cluster, new), timeout=30)
        await load.wait_acked(load.acked + 1000, timeout=60)
    finally:
        stop.set()
        await task
    for p in [api, *workers]:
        assert _alive(p), _logs(p)

    # Acknowledged by the old primary before it died but not on the replica it replicated
    # to: gone from Redis with the old primary.
    gone = take_gone(load, held, killed_at)
    late = [w for ws in gone.values() for w in ws if w.ended > failed_over_at]
    assert not late, [(w.op, w.key, w.version, w.ended - killed_at) for w in late[:10]]

    # A gone write a worker had persisted before the kill is not lost: Postgres holds it
    # (only the newest can show), newer than what the promoted replica caches for the key,
    # which stays stale until invalidated (docs/scaling.md).
    account = await account_failover(load, pg, gone, held, killed_at)
    lost, stale, maybe_stale = account.lost, account.stale, account.maybe_stale
    acked = load.acked
    report = await check_after_failover(load, servers.database_url, account)
    refused = [(t - killed_at, s, ra, c) for t, s, ra, c in probes if s not in (200, 201)]
    numbers = {
        "link": link,
        "min_replicas": min_replicas,
        "acked": acked,
        "unknown": load.unknown,
        "lost": len(lost),
        "lost_keys": len({w.key for w in lost}),
        "gone_from_redis": sum(len(ws) for ws in gone.values()),
        "stale_keys": len(stale),
        "maybe_stale_keys": len(maybe_stale),
        "acked_before_kill": acked_at_kill,
        "pending_on_killed_primary": pending_on_old,
        "pending_in_busiest_shard": pending[busiest],
        "killed_shards": len(killed_shards),
        "failover_s": round(failed_over_at - killed_at, 2),
        "killed_shard_writes_back_s": round(recovered_at - killed_at, 2),
        "restarted_to_ack_s": round(max(0.0, recovered_at - restarted_at), 2),
        "probe_refusals": len(refused),
        "probe_refusal_codes": dict(Counter(c for *_, c in refused)),
        "load_503_codes": dict(load.refusals),
        "counts": dict(load.counts),
        "check": report.summary(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    workers_kind = "arq" if env["ARQ_REDIS_URL"] else "polling"
    _report(f"sigkill-{link}-{workers_kind}-min_replicas={min_replicas}", numbers)
    print(
        f"\n{link}, {workers_kind} workers, REDIS_MIN_REPLICAS={min_replicas}: primary "
        f"{old.port} (shards {killed_shards}, {pending_on_old} keys pending, "
        f"{pending[busiest]} in the busiest shard {busiest}) "
        f"SIGKILLed, {new.port} promoted {numbers['failover_s']}s later; writes to the "
        f"killed shard acknowledged again after {numbers['killed_shard_writes_back_s']}s "
        f"({len(refused)} probe answers refused, {numbers['probe_refusal_codes']})\n"
        f"LOST {len(lost)} of {acked} acknowledged writes (on {numbers['lost_keys']} keys); "
        f"gone from Redis but persisted before the kill: {len(stale)} keys; unknown "
        f"outcome: {load.unknown} {dict(load.refusals)}\n{report.summary()}"
    )
    report.assert_ok()
    assert not any(k.startswith("unexpected") for k in load.counts), load.counts
    odd = [r for r in refused if r[1] != 503 or not (r[2] or "").isdigit()]
    assert not odd, odd
    assert pending_on_old > 0, "nothing was pending on the killed primary"
    if min_replicas:
        assert not gone, [(w.op, w.key, w.version) for ws in gone.values() for w in ws][:20]
        assert not lost
    elif link == "cut-off":
        assert lost, "no acknowledged write lost with the replica cut off: not exercised"
    if stale or maybe_stale:
        # The operator's step after a failover that lost writes: invalidate, and reads load
        # what Postgres holds.
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            r = await http.post("/v1/invalidate", json={"collection": load.collection})
            assert r.status_code == 200, r.text
        again = await load.check(servers.database_url, drain_timeout=60)
        again.assert_ok()


async def test_polling_workers_outlive_a_primary_sigkill(
    procs: Procs,
    servers: Servers,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    prefix: str,
) -> None:
    """The SIGKILL under load again, with no ARQ_REDIS_URL: the workers poll the shards.
    They keep running through the failover (an error of every flush loop at once is a
    Redis outage, not a bug) and hold no batch they no longer flush (its lease runs out and
    is taken over), so the queue drains and nothing acknowledged is lost."""
    with _cluster("wbcache-cluster-kill-poll-", procs) as (cluster, on_cluster):
        await _busiest_shard_primary_sigkill(
            cluster, on_cluster, servers, settings_factory, pg, prefix, 1, "in-sync", ""
        )


# --------------------------------------------------------------------------- resharding


REDIRECTIONS = ("ASK", "TRYAGAIN", "MOVED", "CLUSTERDOWN")


def _redirections(node: RedisServer) -> dict[str, int]:
    """The redirections and refusals ``node`` answered so far, by error prefix (its other
    ERR replies are mostly redis-py's CLIENT SETINFO at each new connection, which Redis
    7.0 does not know)."""
    client = sync_redis.Redis(host=HOST, port=node.port, socket_timeout=5)
    try:
        stats = cast(dict[str, Any], client.info("errorstats"))
    finally:
        client.close()
    return {e: int(stats.get(f"errorstat_{e}", {"count": 0})["count"]) for e in REDIRECTIONS}


def _keys_in_slot(node: RedisServer, slot: int) -> int:
    return int(_ask(node, "CLUSTER", "COUNTKEYSINSLOT", slot))


def _existing(node: RedisServer, names: list[str]) -> int:
    """How many of ``names`` (keys of slots ``node`` serves) exist there, asked without
    the Cluster client's routing: a node that does not serve them answers MOVED."""
    client = sync_redis.Redis(host=HOST, port=node.port, socket_timeout=5)
    try:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return sum(int(n) for n in pipe.execute())
    finally:
        client.close()


async def test_slot_range_moved_mid_load(
    procs: Procs,
    servers: Servers,
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    prefix: str,
) -> None:
    """Sixteen clients write over 200 keys while the slots around the tags of the two
    busiest shards of one primary (entries, dirty sets, in-flight batches, leases: every
    key of those shards) move to another primary online, a few keys per MIGRATE so that
    scripts meet keys on both sides (TRYAGAIN) as well as ASK and then MOVED; workers
    flush throughout. Nothing acknowledged is lost, no answer is a 5xx other than a 503
    with Retry-After, and few are 503s; afterwards the shards' keys live on the target."""
    started = time.monotonic()
    with _cluster("wbcache-cluster-move-", procs) as (cluster, on_cluster):
        env = _env(cluster, _arq_url(servers), WRITE_DELAY_MS="200")
        api = _api(on_cluster, **env)
        workers = [on_cluster("worker", **env), on_cluster("worker", **env)]
        shards = Shards(prefix, SHARDS, tagged=True)
        load = Load([api.url], _collection(), keys=200, clients=16, retries=3, retry_delay=0.3)
        source, target = (await asyncio.to_thread(cluster.primaries))[:2]
        owned = set(await asyncio.to_thread(cluster.slots_of, source))
        keys_of = Counter(shards.index(member(load.collection, k)) for k in load.keys)
        on_source = [s for s in range(SHARDS) if _shard_slot(shards, s) in owned]
        moved = sorted(on_source, key=lambda s: -keys_of[s])[:2]
        tags = [_shard_slot(shards, s) for s in moved]
        slots = sorted({s for t in tags for s in range(t - 8, t + 9) if s in owned})
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(stop=stop, max_seconds=90))
        try:
            await load.wait_acked(1000)
            errors_before = await asyncio.to_thread(_redirections, source)
            acked, unknown = load.acked, load.unknown
            t0 = time.monotonic()
            await asyncio.to_thread(cluster.migrate_slots, slots, source, target, 60, batch=5)
            migration_s = time.monotonic() - t0
            during = (load.acked - acked, load.unknown - unknown)
            await load.wait_acked(load.acked + 1000, timeout=60)
        finally:
            stop.set()
            await task
        for p in [api, *workers]:
            assert _alive(p), _logs(p)
        report = await load.check(servers.database_url, drain_timeout=60)
        errors = await asyncio.to_thread(_redirections, source)
        redirects = {k: n - errors_before[k] for k, n in errors.items()}

        owners = [(await asyncio.to_thread(cluster.primary_for_slot, t)).port for t in tags]
        on_target = [await asyncio.to_thread(_keys_in_slot, target, t) for t in tags]
        left = [await asyncio.to_thread(_keys_in_slot, source, t) for t in tags]
        rows = {
            r["key"]
            for r in await pg.fetch(
                "SELECT key FROM records WHERE collection = $1", load.collection
            )
        }
        entries = [
            shards.for_record(load.collection, k).entry(load.collection, k)
            for k in load.keys
            if shards.index(member(load.collection, k)) in moved and k in rows
        ]
        present = await asyncio.to_thread(_existing, target, entries)

    refused = sum(load.refusals.values())
    writes = load.acked + load.unknown
    _report(
        "slot-range-moved",
        {
            "slots": len(slots),
            "shards": moved,
            "migration_s": round(migration_s, 2),
            "acked": load.acked,
            "unknown": load.unknown,
            "acked_during_migration": during[0],
            "unknown_during_migration": during[1],
            "503s": refused,
            "503_codes": dict(load.refusals),
            "redirects_sent_by_source": redirects,
            "counts": dict(load.counts),
            "check": report.summary(),
            "wall_s": round(time.monotonic() - started, 1),
        },
    )
    print(
        f"\n{len(slots)} slots (shards {moved}, tag slots {tags}) moved {source.port} -> "
        f"{target.port} in {migration_s:.1f}s while {during[0]} writes were acknowledged "
        f"and {during[1]} refused; the source answered {redirects}; 503s {refused} of "
        f"{writes} writes {dict(load.refusals)}; LOST 0 checked below\n{report.summary()}"
    )
    report.assert_ok()
    assert not any(k.startswith("unexpected") for k in load.counts), load.counts
    assert redirects.get("ASK", 0) > 0, (
        f"no ASK redirection: the move was not exercised {redirects}"
    )
    assert refused <= max(20, writes // 100), (refused, writes, dict(load.refusals))
    assert owners == [target.port] * len(tags), owners
    assert all(on_target) and not any(left), (on_target, left)
    assert entries and present == len(entries), (present, len(entries))


# --------------------------------------------------------------------------- no arq


async def _status(env: dict[str, str], database_url: str, prefix: str) -> tuple[int, str, str]:
    """``wbcache status --json`` with a service's environment."""
    full = dict(os.environ)
    full.update({k: v for k, v in env.items() if k != "redis_url"})
    full.update(REDIS_URL=env["redis_url"], DATABASE_URL=database_url, REDIS_PREFIX=prefix)
    proc = await asyncio.create_subprocess_exec(
        *wbcache_argv("status", "--json"),
        env=full,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_worker_without_arq_polls_the_shards(
    procs: Procs, servers: Servers, pg: asyncpg.Connection, prefix: str
) -> None:
    """A Cluster and no ARQ_REDIS_URL: nowhere to queue arq's wake-ups, so ``wbcache
    worker`` polls the shards' queues instead. One write to each of the 16 shards reaches
    Postgres within WRITE_DELAY_MS plus a poll or two; a mixed load of 1,200 writes drains
    within seconds and Postgres holds every acknowledged write; /v1/stats and ``wbcache
    status`` count the worker and nothing pending; SIGTERM stops it at once, exit 0, and
    it leaves the workers set."""
    with _cluster("wbcache-cluster-poll-", procs) as (cluster, on_cluster):
        env = _env(cluster, "", WRITE_DELAY_MS="100")
        api = _api(on_cluster, **env)
        worker = on_cluster("worker", **env)
        await wait_until(lambda: "polling the shards" in worker.output(), timeout=30)
        shards = Shards(prefix, SHARDS, tagged=True)

        c = _collection()
        keys = [_probe_key(c, shards, s) for s in range(SHARDS)]
        async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
            written = time.monotonic()
            for key in keys:
                r = await http.put(f"/v1/{c}/{key}", json={"key": key})
                assert r.status_code == 201, r.text

            async def persisted() -> bool:
                n = await pg.fetchval("SELECT count(*) FROM records WHERE collection = $1", c)
                return bool(n == len(keys))

            await wait_until(persisted, timeout=10, interval=0.01)
            first_flush_s = time.monotonic() - written

            load = Load([api.url], _collection(), keys=200, clients=8)
            await load.run(total=1200, max_seconds=60)
            report = await load.check(servers.database_url, drain_timeout=15)
            stats = (await http.get("/v1/stats")).json()
            code, out, err = await _status(env, servers.database_url, prefix)

            stopping = time.monotonic()
            exit_code = await asyncio.to_thread(worker.terminate, 10)
            stop_s = time.monotonic() - stopping
            after = (await http.get("/v1/stats")).json()
        logs = worker.output()

    _report(
        "poll-without-arq",
        {
            "first_flush_s": round(first_flush_s, 2),
            "load_writes_per_s": round(sum(load.counts.values()) / load.elapsed, 1),
            "drain_s": round(report.drain_seconds, 2),
            "sigterm_exit": exit_code,
            "sigterm_s": round(stop_s, 2),
            "check": report.summary(),
        },
    )
    print(
        f"\n16 writes, one a shard, in Postgres {first_flush_s:.2f}s after the first; "
        f"{sum(load.counts.values())} writes ({load.acked} acknowledged) in "
        f"{load.elapsed:.1f}s, drained "
        f"{report.drain_seconds:.1f}s after the last; SIGTERM -> exit {exit_code} in "
        f"{stop_s:.2f}s\n{report.summary()}"
    )
    report.assert_ok()
    assert load.unknown == 0, load.counts
    assert first_flush_s < 3, first_flush_s
    assert report.drain_seconds < 5, report.drain_seconds
    assert stats["pending"] == 0 and stats["workers"] == 1, stats
    assert code == 0, (code, out, err)
    status = json.loads(out)
    assert status["pending"] == 0 and status["workers"] == 1, status
    assert exit_code == 0, logs[-3000:]
    assert stop_s < 5, stop_s
    assert after["workers"] == 0, after
    assert "Traceback" not in logs, logs[-3000:]
