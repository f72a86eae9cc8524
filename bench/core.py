"""The core benchmark: ``make bench`` (``python -m bench.core``).

Starts real ``wbcache serve`` and ``wbcache worker`` processes on a dedicated Redis db and a
dedicated Postgres database and measures, in one run, side by side:

* raw baseline: asyncpg batched upserts (one ``INSERT ... SELECT FROM unnest(...) ON
  CONFLICT DO UPDATE ... WHERE version <`` per batch) of N distinct keys -> rows/s;
* (a) cold drain: N distinct keys accepted by the API with no worker running, then one
  worker started: rows persisted per second, and the ratio to the raw rate;
* (b) hot burst: W PUTs over K keys from C connections with the worker running: accepted
  writes/s, Postgres row writes per accepted write, seconds from the burst's end until
  nothing is pending.

See bench/README.md for how to read the numbers and the targets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import asyncpg
import orjson
import redis

from bench.env import (
    BENCH_PREFIX,
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    REPO_ROOT,
    CpuSample,
    ProcessGroup,
    Servers,
    ServiceProcess,
    cpu_breakdown,
    cpu_sample,
    database_name,
    service_env,
    start_servers,
    system_cpu_seconds,
)
from bench.http import Connection, HttpError, encode_request
from service.adapters.migrate import migrate

T = TypeVar("T")

RESULTS_DIR = REPO_ROOT / "bench" / "results"

TARGET_COLD_RATIO = 0.3
TARGET_HOT_ROWS_PER_WRITE = 0.5
TARGET_HOT_DRAIN_S = 2.0

# Longest a backend may hold table stats before it reports them (PGSTAT_IDLE_INTERVAL, 10 s),
# plus a margin.
PG_STATS_LAG_S = 11.5

RAW_COLLECTION = "raw"
COLD_COLLECTION = "cold"
HOT_COLLECTION = "hot"

RAW_UPSERT = """
INSERT INTO records (collection, key, value, version, updated_at)
SELECT u.collection, u.key, u.value::jsonb, u.version, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[])
     AS u(collection, key, value, version)
ON CONFLICT (collection, key) DO UPDATE
SET value = excluded.value, version = excluded.version, updated_at = excluded.updated_at
WHERE records.version < excluded.version
"""

ROW_WRITES = """
SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0)::bigint
FROM pg_stat_user_tables WHERE relname = 'records'
"""


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    keys: int
    doc_bytes: int
    batch: int
    raw_rounds: int
    load_connections: int
    hot_writes: int
    hot_keys: int
    connections: int
    api_workers: int
    redis_url: str
    database_url: str
    service_env: dict[str, str]
    results_dir: Path
    hot_order: str
    seed: int
    check: bool
    quick: bool
    py_spy: bool


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.core",
        description="wbcache core benchmark: raw asyncpg upsert vs cold drain vs hot burst.",
    )
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--keys", type=int, help="distinct keys, raw + cold drain (50000)")
    p.add_argument("--doc-bytes", type=int, default=200, help="approximate document size")
    p.add_argument("--batch", type=int, default=1000, help="raw baseline rows per statement")
    p.add_argument("--raw-rounds", type=int, default=2, help="raw baseline rounds (best counts)")
    p.add_argument("--load-connections", type=int, help="connections loading the cold keys (32)")
    p.add_argument("--hot-writes", type=int, help="PUTs in the hot burst (20000)")
    p.add_argument("--hot-keys", type=int, help="distinct keys of the hot burst (2000)")
    p.add_argument("--connections", type=int, help="connections of the hot burst (64)")
    p.add_argument(
        "--hot-order",
        choices=["random", "round-robin"],
        default="random",
        help="key of each hot PUT: uniformly random (seeded), or round-robin (each key "
        "written at even intervals: the worst case for coalescing at a given rate)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of --hot-order random")
    p.add_argument("--api-workers", type=int, default=1, help="wbcache serve --workers N")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("WBCACHE_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        help="dedicated Redis db, FLUSHED at start (env WBCACHE_BENCH_REDIS_URL)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("WBCACHE_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="dedicated database, created/migrated, records TRUNCATED "
        "(env WBCACHE_BENCH_DATABASE_URL; its name must contain 'bench')",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the service processes (e.g. WRITE_DELAY_MS=200); default: none",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument(
        "--py-spy",
        action="store_true",
        help="profile the API and worker with py-spy (folded stacks in the logs directory)",
    )
    a = p.parse_args(argv)

    def pick(value: int | None, full: int, quick: int) -> int:
        if value is not None:
            return value
        return quick if a.quick else full

    env: dict[str, str] = {}
    for item in a.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--service-env wants NAME=VALUE, got {item!r}")
        env[name.upper()] = value
    opts = Options(
        keys=pick(a.keys, 50_000, 5_000),
        doc_bytes=a.doc_bytes,
        batch=a.batch,
        raw_rounds=a.raw_rounds,
        load_connections=pick(a.load_connections, 32, 16),
        hot_writes=pick(a.hot_writes, 20_000, 4_000),
        hot_keys=pick(a.hot_keys, 2_000, 400),
        connections=pick(a.connections, 64, 32),
        api_workers=a.api_workers,
        redis_url=a.redis_url,
        database_url=a.database_url,
        service_env=env,
        results_dir=a.results_dir,
        hot_order=a.hot_order,
        seed=a.seed,
        check=a.check,
        quick=a.quick,
        py_spy=a.py_spy,
    )
    for name in (
        "keys",
        "batch",
        "raw_rounds",
        "load_connections",
        "hot_writes",
        "hot_keys",
        "connections",
    ):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if "bench" not in database_name(opts.database_url):
        p.error(
            f"refusing to truncate database {database_name(opts.database_url)!r}: "
            "use a dedicated database whose name contains 'bench'"
        )
    return opts


# --------------------------------------------------------------------------- documents


def document(i: int, size: int, seq: int = 0) -> bytes:
    """A JSON document of about ``size`` bytes for key number ``i``."""
    doc: dict[str, Any] = {
        "id": i,
        "seq": seq,
        "name": f"user-{i:06d}",
        "email": f"user{i:06d}@example.com",
        "active": i % 3 != 0,
        "score": round(i * 0.37 % 1000, 2),
        "tags": ["alpha", "beta", "gamma"][: 1 + i % 3],
        "address": {"city": "Springfield", "zip": f"{i % 100000:05d}"},
        "notes": "",
    }
    base = len(orjson.dumps(doc))
    doc["notes"] = "x" * max(0, size - base)
    return orjson.dumps(doc)


def key_name(i: int) -> str:
    return f"k{i:07d}"


# --------------------------------------------------------------------------- helpers


def now() -> float:
    return time.monotonic()


async def poll(
    fetch: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    timeout: float,
    interval: float,
    what: str,
    alive: Callable[[], None] | None = None,
) -> T:
    deadline = now() + timeout
    while True:
        value = await fetch()
        if done(value):
            return value
        if alive is not None:
            alive()
        if now() > deadline:
            raise TimeoutError(f"{what}: not done within {timeout:g} s (last: {value!r})")
        await asyncio.sleep(interval)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


class Api:
    """The bench's view of one running API: load connections and a stats connection."""

    def __init__(self, proc: ServiceProcess, port: int) -> None:
        self.proc = proc
        self.host = "127.0.0.1"
        self.port = port
        self.hostport = f"{self.host}:{port}"
        self._stats_conn = Connection(self.host, port)
        self._stats_req = encode_request("GET", "/v1/stats", self.hostport)

    async def wait_ready(self, timeout: float = 60) -> None:
        conn = Connection(self.host, self.port)
        req = encode_request("GET", "/readyz", self.hostport)

        async def attempt() -> int:
            if not self.proc.running():
                raise RuntimeError(f"wbcache serve exited:\n{self.proc.tail()}")
            try:
                status, _ = await conn.send(req)
                return status
            except (OSError, HttpError, asyncio.IncompleteReadError):
                return 0

        try:
            await poll(attempt, lambda s: s == 200, timeout, 0.1, "API /readyz")
        finally:
            await conn.close()

    async def stats(self) -> dict[str, Any]:
        status, body = await self._stats_conn.send(self._stats_req)
        if status != 200:
            raise RuntimeError(f"/v1/stats answered {status}: {body[:300]!r}")
        result: dict[str, Any] = orjson.loads(body)
        return result

    async def close(self) -> None:
        await self._stats_conn.close()


class Meter:
    """CPU samples of everything the benchmark runs (see bench.env.cpu_breakdown)."""

    def __init__(
        self,
        group: ProcessGroup,
        redis_client: redis.Redis,
        pg: asyncpg.Connection,
        database_url: str,
    ) -> None:
        self.group = group
        self.redis = redis_client
        self.pg = pg
        host = urlsplit(database_url).hostname or "localhost"
        self.local_pg = host in ("127.0.0.1", "localhost", "::1")

    async def sample(self) -> CpuSample:
        pids: list[int] = []
        if self.local_pg:
            rows = await self.pg.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            )
            pids = [int(r["pid"]) for r in rows]
        return cpu_sample(self.group.procs, self.redis, pids)


async def background_busy(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU busy before the benchmark starts anything."""
    busy0, total0 = system_cpu_seconds()
    await asyncio.sleep(seconds)
    busy1, total1 = system_cpu_seconds()
    return round((busy1 - busy0) / (total1 - total0), 3) if total1 > total0 else 0.0


@dataclass
class LoadResult:
    requests: int
    seconds: float
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    last_version: dict[int, int] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.statuses[200] + self.statuses[201]

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "accepted": self.accepted,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "connection_errors": self.errors,
            "seconds": round(self.seconds, 3),
            "accepted_per_s": round(self.accepted / self.seconds, 1) if self.seconds else None,
            "latency_ms": {
                "p50": round(percentile(self.latencies, 0.50) * 1000, 2),
                "p95": round(percentile(self.latencies, 0.95) * 1000, 2),
                "p99": round(percentile(self.latencies, 0.99) * 1000, 2),
                "max": round(max(self.latencies, default=0.0) * 1000, 2),
                "mean": round(statistics.fmean(self.latencies) * 1000, 2)
                if self.latencies
                else 0.0,
            },
        }


async def run_load(
    api: Api, requests: list[bytes], key_of: list[int], connections: int
) -> LoadResult:
    """Send ``requests`` (pre-encoded PUTs) over ``connections`` keep-alive connections,
    each taking the next request as soon as its previous one is answered."""
    result = LoadResult(requests=len(requests), seconds=0.0)
    next_index = 0
    last_version = result.last_version
    latencies = result.latencies
    statuses = result.statuses

    async def client() -> None:
        nonlocal next_index
        conn = Connection(api.host, api.port)
        try:
            while next_index < len(requests):
                i = next_index
                next_index += 1
                started = time.perf_counter()
                try:
                    status, body = await conn.send(requests[i])
                except (OSError, HttpError, asyncio.IncompleteReadError):
                    result.errors += 1
                    continue
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
                if status == 200 or status == 201:
                    version = int(orjson.loads(body)["version"])
                    k = key_of[i]
                    if version > last_version.get(k, 0):
                        last_version[k] = version
        finally:
            await conn.close()

    started = now()
    await asyncio.gather(*(client() for _ in range(min(connections, len(requests)))))
    result.seconds = now() - started
    return result


async def settled_row_writes(pg: asyncpg.Connection, idle_since: float) -> int:
    """Rows inserted + updated in ``records`` per pg_stat_user_tables, read once every
    backend that wrote them has had time to report them.

    PostgreSQL 15+ backends keep table counters locally and flush them to shared memory
    when idle, but at most once a second: a backend that flushed less than a second ago
    defers to PGSTAT_IDLE_INTERVAL (10 s) later. So wait until ``idle_since`` (monotonic:
    when the last write to ``records`` ended) + PG_STATS_LAG_S, then until the counter
    stays still for a second."""
    await asyncio.sleep(max(0.0, idle_since + PG_STATS_LAG_S - now()))
    last: int | None = None
    since = now()
    deadline = now() + 30
    while True:
        await pg.execute("SELECT pg_stat_clear_snapshot()")
        value = int(await pg.fetchval(ROW_WRITES))
        if value != last:
            last, since = value, now()
        elif now() - since >= 1.0 or now() > deadline:
            return value
        await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- phases


async def raw_round(pg: asyncpg.Connection, opts: Options, docs: list[bytes]) -> float:
    """One timed upsert of every key into an empty ``records``; returns rows/s."""
    await pg.execute("TRUNCATE records, tombstones")
    version = time.time_ns() // 1000
    started = now()
    for lo in range(0, opts.keys, opts.batch):
        hi = min(opts.keys, lo + opts.batch)
        n = hi - lo
        await pg.execute(
            RAW_UPSERT,
            [RAW_COLLECTION] * n,
            [key_name(i) for i in range(lo, hi)],
            [docs[i].decode() for i in range(lo, hi)],
            [version] * n,
        )
    seconds = now() - started
    count = int(
        await pg.fetchval("SELECT count(*) FROM records WHERE collection = $1", RAW_COLLECTION)
    )
    await pg.execute("TRUNCATE records, tombstones")
    if count != opts.keys:
        raise RuntimeError(f"raw baseline: {count} rows instead of {opts.keys}")
    return count / seconds


async def phase_raw(pg: asyncpg.Connection, opts: Options, docs: list[bytes]) -> dict[str, Any]:
    """The raw rate, best of ``raw_rounds`` (the fastest round is the least disturbed)."""
    rates = [await raw_round(pg, opts, docs) for _ in range(opts.raw_rounds)]
    return {
        "rows": opts.keys,
        "batch": opts.batch,
        "rounds_rows_per_s": [round(r, 1) for r in rates],
        "rows_per_s": round(max(rates), 1),
        "note": "one connection, one statement (and transaction) per batch; best round",
    }


async def phase_cold_load(
    opts: Options, api: Api, meter: Meter, docs: list[bytes]
) -> tuple[LoadResult, CpuSample, CpuSample]:
    headers = (("Content-Type", "application/json"),)
    requests = [
        encode_request(
            "PUT", f"/v1/{COLD_COLLECTION}/{key_name(i)}", api.hostport, docs[i], headers
        )
        for i in range(opts.keys)
    ]
    cpu0 = await meter.sample()
    load = await run_load(api, requests, list(range(opts.keys)), opts.load_connections)
    cpu1 = await meter.sample()
    if load.accepted != opts.keys:
        raise RuntimeError(f"cold load: only {load.accepted} of {opts.keys} PUTs accepted")
    return load, cpu0, cpu1


async def phase_cold_drain(
    opts: Options,
    api: Api,
    group: ProcessGroup,
    pg: asyncpg.Connection,
    meter: Meter,
    raw_rate: float,
) -> tuple[dict[str, Any], float]:
    before = await api.stats()
    cpu1 = await meter.sample()
    # Start one worker and wait until nothing is pending.
    worker_started = now()
    worker = group.worker()
    first_progress: float | None = None

    def alive() -> None:
        if not worker.running():
            raise RuntimeError(f"wbcache worker exited:\n{worker.tail()}")

    async def fetch() -> dict[str, Any]:
        nonlocal first_progress
        s = await api.stats()
        if first_progress is None and s["pending"] < before["pending"]:
            first_progress = now()
        return s

    timeout = max(120.0, opts.keys / 200)
    after = await poll(fetch, lambda s: s["pending"] == 0, timeout, 0.05, "cold drain", alive)
    done = now()
    cpu2 = await meter.sample()

    row = await pg.fetchrow(
        """
        SELECT count(*) AS n, min(updated_at) AS first, max(updated_at) AS last,
               count(DISTINCT updated_at) AS batches
        FROM records WHERE collection = $1
        """,
        COLD_COLLECTION,
    )
    assert row is not None
    last_batch = int(
        await pg.fetchval(
            "SELECT count(*) FROM records WHERE collection = $1 AND updated_at = $2",
            COLD_COLLECTION,
            row["last"],
        )
    )
    persisted = int(row["n"])
    span = (row["last"] - row["first"]).total_seconds() if persisted else 0.0
    # updated_at is now() = the start of each batch's transaction: between the first and
    # the last batch's start, every batch but the last was committed.
    db_rate = (persisted - last_batch) / span if span > 0 else None
    wall = done - first_progress if first_progress is not None else None
    wall_rate = opts.keys / wall if wall else None
    rate = db_rate if db_rate is not None else wall_rate
    result = {
        "keys": opts.keys,
        "pending_before_worker": before["pending"],
        "persisted_rows": persisted,
        "dead_letters": after["dead_letters"],
        "batches": int(row["batches"]),
        "db_span_s": round(span, 3),
        "rows_per_s_db": round(db_rate, 1) if db_rate is not None else None,
        "rows_per_s_wall": round(wall_rate, 1) if wall_rate is not None else None,
        "worker_start_to_drained_s": round(done - worker_started, 3),
        "rows_per_s": round(rate, 1) if rate is not None else None,
        "ratio_to_raw": round(rate / raw_rate, 3) if rate is not None and raw_rate else None,
        "cpu_drain": cpu_breakdown(cpu1, cpu2),
        "ok": persisted == opts.keys and after["dead_letters"] == 0,
    }
    return result, done


async def phase_hot(
    opts: Options,
    api: Api,
    group: ProcessGroup,
    pg: asyncpg.Connection,
    meter: Meter,
    idle_since: float,
) -> dict[str, Any]:
    headers = (("Content-Type", "application/json"),)
    if opts.hot_order == "round-robin":
        key_of = [i % opts.hot_keys for i in range(opts.hot_writes)]
    else:
        rng = random.Random(opts.seed)
        key_of = [rng.randrange(opts.hot_keys) for _ in range(opts.hot_writes)]
    requests = [
        encode_request(
            "PUT",
            f"/v1/{HOT_COLLECTION}/{key_name(k)}",
            api.hostport,
            document(k, opts.doc_bytes, seq=i),
            headers,
        )
        for i, k in enumerate(key_of)
    ]
    writes0 = await settled_row_writes(pg, idle_since)
    stats0 = await api.stats()
    cpu0 = await meter.sample()
    load = await run_load(api, requests, key_of, opts.connections)
    burst_end = now()
    cpu1 = await meter.sample()
    pending_at_end = (await api.stats())["pending"]
    after = await poll(api.stats, lambda s: s["pending"] == 0, 120, 0.02, "hot drain")
    drain_s = now() - burst_end
    cpu2 = await meter.sample()
    writes1 = await settled_row_writes(pg, now())
    row_writes = writes1 - writes0

    rows = await pg.fetch("SELECT key, version FROM records WHERE collection = $1", HOT_COLLECTION)
    in_pg = {r["key"]: int(r["version"]) for r in rows}
    wrong = sum(1 for k, v in load.last_version.items() if in_pg.get(key_name(k)) != v)
    accepted = load.accepted
    return {
        "writes": opts.hot_writes,
        "keys": opts.hot_keys,
        "keys_written": len(set(key_of)),
        "order": opts.hot_order,
        "connections": opts.connections,
        "burst": load.summary(),
        "accepted_per_s": round(accepted / load.seconds, 1) if load.seconds else None,
        "pending_at_burst_end": pending_at_end,
        "drain_s": round(drain_s, 3),
        "pg_row_writes": row_writes,
        "row_writes_per_accepted_write": round(row_writes / accepted, 4) if accepted else None,
        "worker_flushed_items": after["flushed"] - stats0["flushed"],
        "worker_batches": after["flush_batches"] - stats0["flush_batches"],
        "dead_letters": after["dead_letters"],
        "keys_with_wrong_version_in_pg": wrong,
        "cpu_burst": cpu_breakdown(cpu0, cpu1),
        "cpu_drain": cpu_breakdown(cpu1, cpu2),
        "ok": wrong == 0
        and len(in_pg) == len(set(key_of))
        and after["dead_letters"] == 0
        and accepted == opts.hot_writes,
    }


# --------------------------------------------------------------------------- environment facts


async def pg_facts(pg: asyncpg.Connection) -> dict[str, Any]:
    facts: dict[str, Any] = {"version": await pg.fetchval("SHOW server_version")}
    for name in ("fsync", "synchronous_commit", "shared_buffers", "wal_level"):
        facts[name] = await pg.fetchval(f"SHOW {name}")
    return facts


def redis_facts(client: redis.Redis) -> dict[str, Any]:
    info = cast(dict[str, Any], client.info("server"))
    facts: dict[str, Any] = {"version": info.get("redis_version")}
    with contextlib.suppress(redis.RedisError):
        for name in ("appendonly", "appendfsync", "maxmemory-policy"):
            facts[name] = cast(dict[str, Any], client.config_get(name)).get(name)
    return facts


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "service", "worker"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("+dirty" if dirty else "")


# --------------------------------------------------------------------------- report


def _fmt(value: Any, unit: str = "", digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float | int):
        text = f"{value:,.{digits}f}"
    else:
        text = str(value)
    return f"{text} {unit}".rstrip()


def _verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "MISS")


def table(results: dict[str, Any]) -> str:
    raw, cold, hot = results["raw"], results["cold"], results["hot"]
    t = results["targets"]
    rows: list[tuple[str, str, str, str, str]] = [
        (
            "raw baseline",
            f"asyncpg batched upsert (best of {len(raw['rounds_rows_per_s'])})",
            _fmt(raw["rows_per_s"], "rows/s"),
            "",
            "",
        ),
        (
            "(a) cold drain",
            f"load {cold['keys']:,} keys, no worker",
            _fmt(cold["load"]["accepted_per_s"], "writes/s"),
            "",
            "",
        ),
        ("", "drain rate (Postgres timestamps)", _fmt(cold["rows_per_s_db"], "rows/s"), "", ""),
        ("", "drain rate (wall clock, polled)", _fmt(cold["rows_per_s_wall"], "rows/s"), "", ""),
        (
            "",
            "drain rate / raw rate",
            _fmt(cold["ratio_to_raw"], "x", 2),
            f">= {TARGET_COLD_RATIO}x",
            _verdict(t["cold_ratio"]),
        ),
        (
            "",
            "worker start -> all persisted",
            _fmt(cold["worker_start_to_drained_s"], "s", 2),
            "",
            "",
        ),
        (
            "(b) hot burst",
            f"{hot['writes']:,} PUTs / {hot['keys']:,} keys / {hot['connections']} conns",
            _fmt(hot["accepted_per_s"], "writes/s"),
            "",
            "",
        ),
        (
            "",
            "PUT latency p50 / p99",
            f"{hot['burst']['latency_ms']['p50']:.1f} / {hot['burst']['latency_ms']['p99']:.1f} ms",
            "",
            "",
        ),
        (
            "",
            "Postgres row writes / accepted write",
            _fmt(hot["row_writes_per_accepted_write"], "", 3),
            f"<= {TARGET_HOT_ROWS_PER_WRITE}",
            _verdict(t["hot_rows_per_write"]),
        ),
        (
            "",
            "burst end -> pending 0",
            _fmt(hot["drain_s"], "s", 2),
            f"<= {TARGET_HOT_DRAIN_S} s",
            _verdict(t["hot_drain"]),
        ),
        (
            "checks",
            "all persisted, versions right, no dead letters",
            "yes" if cold["ok"] and hot["ok"] else "NO",
            "",
            "",
        ),
    ]
    header = ("phase", "metric", "value", "target", "")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = []
    for r in [header, *rows]:
        cells = [
            r[0].ljust(widths[0]),
            r[1].ljust(widths[1]),
            r[2].rjust(widths[2]),
            r[3].ljust(widths[3]),
            r[4],
        ]
        lines.append("  ".join(cells).rstrip())
    sep = "-" * len(max(lines, key=len))
    lines.insert(1, sep)
    return "\n".join(lines)


def cpu_table(results: dict[str, Any]) -> str:
    phases = [
        ("cold load", results["cold"]["cpu_load"]),
        ("cold drain", results["cold"]["cpu_drain"]),
        ("hot burst", results["hot"]["cpu_burst"]),
        ("hot drain", results["hot"]["cpu_drain"]),
    ]
    names: list[str] = []
    for _, cpu in phases:
        for name in cpu:
            if name not in names:
                names.append(name)
    header = ["CPU seconds", *names]
    rows = [[label, *(f"{cpu.get(n, 0.0):.2f}" for n in names)] for label, cpu in phases]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    )


# --------------------------------------------------------------------------- main


async def run(opts: Options, servers: Servers, log_dir: Path) -> dict[str, Any]:
    redis_client = redis.Redis.from_url(servers.redis_url)
    pg = await asyncpg.connect(servers.database_url)
    env = service_env(servers.redis_url, servers.database_url, BENCH_PREFIX, opts.service_env)
    group = ProcessGroup(log_dir, env, profile=opts.py_spy)
    meter = Meter(group, redis_client, pg, servers.database_url)
    api: Api | None = None
    try:
        results: dict[str, Any] = {
            "postgres": await pg_facts(pg),
            "redis": redis_facts(redis_client),
            "background_cpu_busy": await background_busy(),
        }
        docs = [document(i, opts.doc_bytes) for i in range(opts.keys)]
        results["doc_bytes_mean"] = round(statistics.fmean(len(d) for d in docs), 1)

        await pg.execute("TRUNCATE records, tombstones")
        proc, port = group.api(workers=opts.api_workers)
        api = Api(proc, port)
        await api.wait_ready()

        print(f"(a) cold drain: loading {opts.keys:,} keys with no worker running ...")
        load, cpu0, cpu1 = await phase_cold_load(opts, api, meter, docs)
        print(f"  {load.accepted:,} accepted at {load.accepted / load.seconds:,.0f} writes/s")

        # The baseline runs now, next to the drain, so both see the same machine: the cold
        # writes are still in Redis only, so records can be emptied for it.
        print(
            f"raw baseline: upserting {opts.keys:,} rows in batches of {opts.batch}, "
            f"{opts.raw_rounds} rounds ..."
        )
        results["raw"] = raw = await phase_raw(pg, opts, docs)
        print(f"  {', '.join(f'{r:,.0f}' for r in raw['rounds_rows_per_s'])} rows/s")

        print("(a) cold drain: starting one worker ...")
        cold, cold_done = await phase_cold_drain(opts, api, group, pg, meter, raw["rows_per_s"])
        cold["load"] = load.summary()
        cold["load_connections"] = opts.load_connections
        cold["cpu_load"] = cpu_breakdown(cpu0, cpu1)
        results["cold"] = cold
        print(
            f"  drained at {_fmt(cold['rows_per_s'], 'rows/s')} "
            f"({_fmt(cold['ratio_to_raw'], 'x', 2)} raw)"
        )

        print(
            f"(b) hot burst: {opts.hot_writes:,} PUTs over {opts.hot_keys:,} keys, "
            f"{opts.connections} connections ..."
        )
        hot = await phase_hot(opts, api, group, pg, meter, cold_done)
        results["hot"] = hot
        print(
            f"  {hot['accepted_per_s']:,.0f} writes/s accepted, "
            f"{hot['row_writes_per_accepted_write']} row writes/write, "
            f"pending 0 after {hot['drain_s']:.2f} s"
        )
        results["targets"] = {
            "cold_ratio": cold["ratio_to_raw"] is not None
            and cold["ratio_to_raw"] >= TARGET_COLD_RATIO,
            "hot_rows_per_write": hot["row_writes_per_accepted_write"] is not None
            and hot["row_writes_per_accepted_write"] <= TARGET_HOT_ROWS_PER_WRITE,
            "hot_drain": hot["drain_s"] <= TARGET_HOT_DRAIN_S,
        }
        return results
    finally:
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        group.stop_all()
        await pg.close()
        redis_client.close()


def prepare(opts: Options, servers: Servers) -> None:
    client = redis.Redis.from_url(servers.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    migrate(servers.database_url)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _main_task(opts: Options, servers: Servers, log_dir: Path) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run(opts, servers, log_dir)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = opts.results_dir / f"core-{stamp}-logs"
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    servers: Servers | None = None
    try:
        servers = start_servers(opts.redis_url, opts.database_url)
        for note in servers.notes:
            print(note)
        prepare(opts, servers)
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            results = runner.run(_main_task(opts, servers, log_dir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every process the benchmark started is stopped", file=sys.stderr)
        return 130
    finally:
        if servers is not None:
            servers.close()

    results = {
        "started_at": started_at,
        "git": git_revision(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {
            "keys": opts.keys,
            "doc_bytes": opts.doc_bytes,
            "raw_batch": opts.batch,
            "raw_rounds": opts.raw_rounds,
            "load_connections": opts.load_connections,
            "hot_writes": opts.hot_writes,
            "hot_keys": opts.hot_keys,
            "connections": opts.connections,
            "hot_order": opts.hot_order,
            "api_workers": opts.api_workers,
            "service_env": opts.service_env,
            "redis": _safe_url(servers.redis_url),
            "database": _safe_url(servers.database_url),
            "throwaway_servers": servers.notes,
            "quick": opts.quick,
        },
        **results,
        "logs": str(log_dir),
    }
    out = opts.results_dir / f"core-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"wbcache core benchmark  {started_at}  git {results['git']}  "
        f"{results['machine']['cpus']} CPUs  PostgreSQL {results['postgres']['version']}  "
        f"Redis {results['redis']['version']}  "
        f"(machine {results['background_cpu_busy']:.0%} busy before start)"
    )
    print(table(results))
    print()
    print(cpu_table(results))
    print()
    print(f"results: {out}")
    print(f"logs:    {log_dir}")
    if opts.check and not all(results["targets"].values()):
        return 1
    if not (results["cold"]["ok"] and results["hot"]["ok"]):
        print("WARNING: a correctness check failed (see the JSON)", file=sys.stderr)
        return 2
    return 0


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


if __name__ == "__main__":
    sys.exit(main())
