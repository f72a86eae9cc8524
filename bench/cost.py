"""The cost curve: ``python -m bench.cost`` (also ``python -m bench.suite --sections cost``).

How the cost grows with the work. For each point N (distinct keys written; 10k, 100k, 1M
by default), on an empty Redis prefix and an empty ``records``:

* PUT rate: N distinct keys PUT by the loader of bench/core.py (32 keep-alive connections)
  with no worker running, so all N stay pending;
* Redis bytes per record while pending: ``MEMORY USAGE`` of sampled entries, the queue
  structures (dirty ZSET, pending counts, ...) per record, and ``INFO memory`` used_memory
  before and after the load / N; next to the document's size;
* ``/v1/stats`` latency with N keys pending;
* the raw batched upsert of N rows (bench/core.py), then the cold-drain rate of one
  worker (bench/core.py);
* once drained: Redis bytes per (clean, expiring) record, and Postgres heap, index and
  total bytes per row of ``records``.

``--prefill-rows R`` adds the largest point once more on a ``records`` that already holds
R rows (10M in the issue). Then a delete-heavy load (K keys written and deleted, twice):
tombstone rows and bytes, and the garbage collection that bounds them
(TOMBSTONE_RETENTION_DAYS, run by the worker's sweep). Last, on a throwaway Redis: what
trims Redis bytes per record (hash encoding, field names, TTL). The rates against N are
drawn to docs/img/cost-curve.png.

See bench/README.md for how to run and read it, docs/performance.md for results.
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
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncpg
import orjson
import redis

from bench import core
from bench.env import (
    REPO_ROOT,
    ProcessGroup,
    Servers,
    cpu_breakdown,
    database_name,
    service_env,
    start_servers,
)
from bench.http import encode_request
from service.config import Settings
from service.core.redis_keys import Keys
from service.dev.embedded import RedisServer

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/10"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/wbcache_bench_cost"
DEFAULT_POINTS = (10_000, 100_000, 1_000_000)
QUICK_POINTS = (2_000, 10_000)
# As long as the default REDIS_PREFIX ("wb:"), so key names cost what they cost deployed.
PREFIX = "wc:"
CHART = REPO_ROOT / "docs" / "img" / "cost-curve.png"
# A smoke run (--quick) must not overwrite the committed chart.
QUICK_CHART = core.RESULTS_DIR / "cost-curve-quick.png"
COLLECTION = core.COLD_COLLECTION
PREFILL_COLLECTION = "prefill"
DELETE_COLLECTION = "del"
PREFILL_CHUNK = 1_000_000

# Every queue and bookkeeping key of a shard (service/core/redis_keys.py), by attribute.
QUEUE_KEYS = (
    "dirty",
    "inflight",
    "pending_counts",
    "pending_keys",
    "leases",
    "batch_age",
    "dead",
    "wake",
    "counters",
    "flush_log",
    "workers",
    "last_error",
    "arq_queue",
)


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    points: list[int] = field(default_factory=lambda: list(DEFAULT_POINTS))
    prefill_rows: int = 0
    doc_bytes: int = 200
    connections: int = 32
    raw_rounds: int = 2
    batch: int = 1000
    stats_requests: int = 50
    samples: int = 1000
    delete_keys: int = 10_000
    trim_entries: int = 100_000
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    service_env: dict[str, str] = field(default_factory=dict)
    results_dir: Path = core.RESULTS_DIR
    chart: Path | None = CHART
    seed: int = 1
    quick: bool = False


def _ints(text: str) -> list[int]:
    return [int(v.replace("_", "")) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.cost",
        description="wbcache cost curve: rates and bytes per record against keys written.",
    )
    p.add_argument("--quick", action="store_true", help="small points for a smoke run")
    p.add_argument("--points", help="distinct keys per point (10000,100000,1000000)")
    p.add_argument(
        "--prefill-rows",
        type=int,
        default=0,
        help="also run the largest point on a records table already holding this many "
        "rows (10000000 in issue 11; 0: skip)",
    )
    p.add_argument("--doc-bytes", type=int, default=200, help="approximate document size")
    p.add_argument("--connections", type=int, default=32, help="loader connections (PUT)")
    p.add_argument("--raw-rounds", type=int, default=2, help="raw upsert rounds (best counts)")
    p.add_argument("--batch", type=int, default=1000, help="raw upsert rows per statement")
    p.add_argument("--stats-requests", type=int, default=50, help="/v1/stats calls per point")
    p.add_argument("--samples", type=int, default=1000, help="entries sampled for MEMORY USAGE")
    p.add_argument("--delete-keys", type=int, help="keys of the delete-heavy load (10000)")
    p.add_argument(
        "--trim-entries",
        type=int,
        help="entries per variant of the throwaway-Redis trim experiment (100000; 0: skip)",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the sampled entries")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("WBCACHE_COST_REDIS_URL", DEFAULT_REDIS_URL),
        help="dedicated Redis db, FLUSHED at start (env WBCACHE_COST_REDIS_URL)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("WBCACHE_COST_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="dedicated database, created/migrated, TRUNCATED (env WBCACHE_COST_DATABASE_URL; "
        "its name must contain 'bench')",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the service processes (default: none, i.e. default settings)",
    )
    p.add_argument("--results-dir", type=Path, default=core.RESULTS_DIR)
    p.add_argument("--chart", type=Path, help=f"PNG to draw ({CHART}; --quick: {QUICK_CHART})")
    p.add_argument("--no-chart", action="store_true", help="draw no PNG")
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="print a finished run's table (a cost or "
        "suite JSON) and redraw its chart; run nothing",
    )
    a = p.parse_args(argv)
    env: dict[str, str] = {}
    for item in a.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--service-env wants NAME=VALUE, got {item!r}")
        env[name.upper()] = value
    default_points = QUICK_POINTS if a.quick else DEFAULT_POINTS
    opts = Options(
        points=_ints(a.points) if a.points else list(default_points),
        prefill_rows=a.prefill_rows,
        doc_bytes=a.doc_bytes,
        connections=a.connections,
        raw_rounds=a.raw_rounds,
        batch=a.batch,
        stats_requests=a.stats_requests,
        samples=a.samples,
        delete_keys=a.delete_keys if a.delete_keys is not None else (2_000 if a.quick else 10_000),
        trim_entries=a.trim_entries
        if a.trim_entries is not None
        else (2_000 if a.quick else 100_000),
        redis_url=a.redis_url,
        database_url=a.database_url,
        service_env=env,
        results_dir=a.results_dir,
        chart=None if a.no_chart else (a.chart or (QUICK_CHART if a.quick else CHART)),
        seed=a.seed,
        quick=a.quick,
    )
    if not opts.points or min(opts.points) < 1:
        p.error("--points: at least one point, each >= 1")
    if "bench" not in database_name(opts.database_url):
        p.error(
            f"refusing to truncate database {database_name(opts.database_url)!r}: "
            "use a dedicated database whose name contains 'bench'"
        )
    return opts


def suite_options(
    points: list[int], doc_bytes: int, service_env: dict[str, str], quick: bool
) -> Options:
    """The section's options inside ``python -m bench.suite`` (its servers, its flags)."""
    default_points = QUICK_POINTS if quick else DEFAULT_POINTS
    return Options(
        points=points or list(default_points),
        doc_bytes=doc_bytes,
        service_env=service_env,
        delete_keys=2_000 if quick else 10_000,
        trim_entries=2_000 if quick else 100_000,
        chart=QUICK_CHART if quick else CHART,
        quick=quick,
    )


def core_options(opts: Options, servers: Servers, keys: int) -> core.Options:
    """bench/core.py's options for ``keys`` distinct keys (its phases take them)."""
    return core.parse_args(
        [
            *("--keys", str(keys), "--doc-bytes", str(opts.doc_bytes)),
            *("--load-connections", str(opts.connections)),
            *("--raw-rounds", str(opts.raw_rounds), "--batch", str(opts.batch)),
            *("--redis-url", servers.redis_url, "--database-url", servers.database_url),
        ]
    )


# --------------------------------------------------------------------------- Redis


def used_memory(client: redis.Redis) -> int:
    """INFO memory's used_memory less the clients' buffers (mem_clients_normal): the
    load's 32 connections and the service's pools are not a cost of the records."""
    info = cast(dict[str, Any], client.info("memory"))
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


def keyspace(client: redis.Redis) -> dict[str, int]:
    db = int(client.connection_pool.connection_kwargs.get("db", 0))
    info = cast(dict[str, Any], client.info("keyspace")).get(f"db{db}", {})
    return {"keys": int(info.get("keys", 0)), "expires": int(info.get("expires", 0))}


def entry_costs(
    client: redis.Redis, keys: Keys, collection: str, indices: list[int]
) -> dict[str, Any]:
    """``MEMORY USAGE`` (key name, value and Redis' per-key overhead; not the expires
    entry of a key with a TTL) of the sampled entries, their encoding, the stored
    document's length and whether they expire."""
    names = [keys.entry(collection, core.key_name(i)) for i in indices]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.memory_usage(name, samples=0)
        pipe.object("encoding", name)
        pipe.hstrlen(name, "d")
        pipe.pttl(name)
    replies = pipe.execute()
    usage: list[int] = []
    docs: list[int] = []
    encodings: Counter[str] = Counter()
    expiring = 0
    for j in range(len(names)):
        mem, enc, doc_len, ttl = replies[4 * j : 4 * j + 4]
        if mem is None:
            continue
        usage.append(int(mem))
        docs.append(int(doc_len))
        encodings[enc.decode() if isinstance(enc, bytes) else str(enc)] += 1
        expiring += int(ttl) > 0
    return {
        "sampled": len(usage),
        "bytes_mean": round(statistics.fmean(usage), 1) if usage else None,
        "bytes_min": min(usage, default=None),
        "bytes_max": max(usage, default=None),
        "stored_doc_bytes_mean": round(statistics.fmean(docs), 1) if docs else None,
        "key_name_bytes": len(names[0]) if names else None,
        "encodings": dict(encodings),
        "with_ttl": expiring,
    }


def structure_costs(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """``MEMORY USAGE ... SAMPLES 0`` (every element counted) of each queue and
    bookkeeping key that exists, and the dirty ZSET's encoding."""
    per_key: dict[str, int] = {}
    for attr in QUEUE_KEYS:
        usage = cast(int | None, client.memory_usage(getattr(keys, attr), samples=0))
        if usage:
            per_key[attr] = int(usage)
    encoding = client.object("encoding", keys.dirty)
    return {
        "bytes": per_key,
        "total_bytes": sum(per_key.values()),
        "dirty_members": cast(int, client.zcard(keys.dirty)),
        "dirty_encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
    }


def redis_costs(
    client: redis.Redis, keys: Keys, n: int, indices: list[int], memory_before: int
) -> dict[str, Any]:
    entries = entry_costs(client, keys, COLLECTION, indices)
    structures = structure_costs(client, keys)
    delta = used_memory(client) - memory_before
    per_entry = entries["bytes_mean"] or 0.0
    return {
        "entry": entries,
        "structures": structures,
        "structures_bytes_per_record": round(structures["total_bytes"] / n, 1),
        "entry_plus_structures_per_record": round(per_entry + structures["total_bytes"] / n, 1),
        "used_memory_delta": delta,
        "used_memory_delta_per_record": round(delta / n, 1),
        "keyspace": keyspace(client),
    }


def drop_prefix(client: redis.Redis, prefix: str) -> int:
    """UNLINK every key under ``prefix`` (between points: each starts empty)."""
    dropped = 0
    batch: list[bytes] = []
    for name in client.scan_iter(match=f"{prefix}*", count=10_000):
        batch.append(name)
        if len(batch) >= 5_000:
            dropped += cast(int, client.unlink(*batch))
            batch = []
    if batch:
        dropped += cast(int, client.unlink(*batch))
    return dropped


# --------------------------------------------------------------------------- Postgres


async def table_sizes(pg: asyncpg.Connection, table: str) -> dict[str, Any]:
    """Heap, index and total (heap + indexes + TOAST + free space and visibility maps)
    bytes of ``table``, and per row."""
    rows = int(await pg.fetchval(f"SELECT count(*) FROM {table}"))
    r = await pg.fetchrow(
        "SELECT pg_relation_size($1::regclass) AS heap, pg_indexes_size($1::regclass) AS idx, "
        "pg_total_relation_size($1::regclass) AS total",
        table,
    )
    assert r is not None

    def per_row(v: int) -> float | None:
        return round(v / rows, 1) if rows else None

    return {
        "rows": rows,
        "heap_bytes": int(r["heap"]),
        "index_bytes": int(r["idx"]),
        "total_bytes": int(r["total"]),
        "heap_per_row": per_row(int(r["heap"])),
        "index_per_row": per_row(int(r["idx"])),
        "total_per_row": per_row(int(r["total"])),
    }


async def postgres_costs(pg: asyncpg.Connection) -> dict[str, Any]:
    out = await table_sizes(pg, "records")
    r = await pg.fetchrow(
        "SELECT avg(pg_column_size(r.value))::float AS value, avg(pg_column_size(r.*))::float "
        "AS tuple FROM (SELECT * FROM records WHERE collection = $1 LIMIT 10000) r",
        COLLECTION,
    )
    assert r is not None
    out["jsonb_value_bytes_mean"] = round(r["value"], 1) if r["value"] is not None else None
    out["tuple_bytes_mean"] = round(r["tuple"], 1) if r["tuple"] is not None else None
    return out


_PREFILL = """
INSERT INTO records (collection, key, value, version, updated_at)
SELECT $1, 'p' || lpad(i::text, 9, '0'),
       jsonb_build_object(
           'id', i, 'seq', 0, 'name', 'user-' || lpad(i::text, 6, '0'),
           'email', 'user' || lpad(i::text, 6, '0') || '@example.com', 'active', i % 3 <> 0,
           'score', round((i * 0.37)::numeric % 1000, 2), 'tags', '["alpha", "beta"]'::jsonb,
           'address', jsonb_build_object('city', 'Springfield',
                                         'zip', lpad((i % 100000)::text, 5, '0')),
           'notes', repeat('x', $4::int)),
       1, now()
FROM generate_series($2::bigint, $3::bigint) AS i
"""


async def prefill_postgres(pg: asyncpg.Connection, rows: int, doc_bytes: int) -> dict[str, Any]:
    """``rows`` rows of ~``doc_bytes`` documents in their own collection, made by
    Postgres itself (generate_series, 1M rows per statement), then VACUUM ANALYZE and a
    checkpoint so the point after it starts settled."""
    pad = len(orjson.loads(core.document(rows, doc_bytes))["notes"])
    started = time.monotonic()
    for lo in range(0, rows, PREFILL_CHUNK):
        hi = min(rows, lo + PREFILL_CHUNK) - 1
        await pg.execute(_PREFILL, PREFILL_COLLECTION, lo, hi, pad, timeout=3600)
        print(f"  prefill: {hi + 1:,} rows, {time.monotonic() - started:,.0f} s")
    inserted = time.monotonic() - started
    await pg.execute("VACUUM ANALYZE records", timeout=3600)
    with contextlib.suppress(asyncpg.PostgresError):
        await pg.execute("CHECKPOINT", timeout=3600)
    return {
        "rows": rows,
        "insert_s": round(inserted, 1),
        "total_s": round(time.monotonic() - started, 1),
        "sizes": await table_sizes(pg, "records"),
    }


async def raw_beside(
    pg: asyncpg.Connection, copts: core.Options, docs: list[bytes]
) -> dict[str, Any]:
    """core.phase_raw into a table that keeps its rows (core's rounds TRUNCATE it): the
    same statement and batches, then this round's rows deleted and vacuumed away."""
    rates: list[float] = []
    for _ in range(copts.raw_rounds):
        version = time.time_ns() // 1000
        started = time.monotonic()
        for lo in range(0, copts.keys, copts.batch):
            hi = min(copts.keys, lo + copts.batch)
            await pg.execute(
                core.RAW_UPSERT,
                [core.RAW_COLLECTION] * (hi - lo),
                [core.key_name(i) for i in range(lo, hi)],
                [docs[i].decode() for i in range(lo, hi)],
                [version] * (hi - lo),
            )
        rates.append(copts.keys / (time.monotonic() - started))
        await pg.execute("DELETE FROM records WHERE collection = $1", core.RAW_COLLECTION)
        await pg.execute("VACUUM records", timeout=3600)
    return {
        "rows": copts.keys,
        "batch": copts.batch,
        "rounds_rows_per_s": [round(r, 1) for r in rates],
        "rows_per_s": round(max(rates), 1),
        "note": "one connection, one statement per batch, into a table that keeps its rows; "
        "best round",
    }


# --------------------------------------------------------------------------- API


async def stats_latency(api: core.Api, requests: int) -> dict[str, Any]:
    """``/v1/stats`` answered ``requests`` times in a row on one keep-alive connection."""
    times: list[float] = []
    last: dict[str, Any] = {}
    for _ in range(requests):
        started = time.perf_counter()
        last = await api.stats()
        times.append(time.perf_counter() - started)
    return {
        "requests": requests,
        "pending": last.get("pending"),
        "p50_ms": round(core.percentile(times, 0.50) * 1000, 2),
        "p99_ms": round(core.percentile(times, 0.99) * 1000, 2),
        "max_ms": round(max(times, default=0.0) * 1000, 2),
    }


async def drained(api: core.Api, group: ProcessGroup, timeout: float) -> dict[str, Any]:
    def alive() -> None:
        for proc in group.procs:
            if proc.name.startswith("worker") and not proc.running():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")

    return await core.poll(api.stats, lambda s: s["pending"] == 0, timeout, 0.05, "drain", alive)


def requests_for(api: core.Api, method: str, collection: str, docs: list[bytes]) -> list[bytes]:
    headers = (("Content-Type", "application/json"),) if method == "PUT" else ()
    return [
        encode_request(
            method,
            f"/v1/{collection}/{core.key_name(i)}",
            api.hostport,
            docs[i] if method == "PUT" else b"",
            headers,
        )
        for i in range(len(docs))
    ]


# --------------------------------------------------------------------------- one point


@dataclass
class Ctx:
    """What every part of the run shares: options, servers, clients, logs."""

    opts: Options
    servers: Servers
    redis: redis.Redis
    pg: asyncpg.Connection
    log_dir: Path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return service_env(
            self.servers.redis_url,
            self.servers.database_url,
            PREFIX,
            {**self.opts.service_env, **(extra or {})},
        )


async def _progress(client: redis.Redis, keys: Keys, n: int, every: float = 30.0) -> None:
    """A line every ``every`` seconds while a long load runs (ZCARD of the dirty set)."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(every)
        pending = cast(int, client.zcard(keys.dirty))
        print(f"    {pending:,} of {n:,} pending, {time.monotonic() - started:,.0f} s", flush=True)


async def point(ctx: Ctx, n: int, prefill_rows: int) -> dict[str, Any]:
    """One point of the curve: N keys PUT with no worker (pending), measured, raw upsert,
    then drained by one worker, measured again."""
    opts, client, pg = ctx.opts, ctx.redis, ctx.pg
    copts = core_options(opts, ctx.servers, n)
    name = f"{n}" + (f"+{prefill_rows}" if prefill_rows else "")
    group = ProcessGroup(ctx.log_dir / f"point-{name}", ctx.env())
    meter = core.Meter(group, client, pg, ctx.servers.database_url)
    keys = Keys(PREFIX)
    out: dict[str, Any] = {"keys": n, "prefill_rows": prefill_rows}
    drop_prefix(client, PREFIX)
    await pg.execute("TRUNCATE records, tombstones")
    if prefill_rows:
        print(f"  prefill: {prefill_rows:,} rows into records ...")
        out["prefill"] = await prefill_postgres(pg, prefill_rows, opts.doc_bytes)
        print(f"  prefill took {out['prefill']['total_s']:,.0f} s")
    docs = [core.document(i, opts.doc_bytes) for i in range(n)]
    out["doc_bytes_mean"] = round(statistics.fmean(len(d) for d in docs), 1)
    indices = sorted(random.Random(opts.seed).sample(range(n), min(n, opts.samples)))
    api: core.Api | None = None
    try:
        proc, port = group.api()
        api = core.Api(proc, port)
        await api.wait_ready()
        memory0 = used_memory(client)

        print(f"  PUT {n:,} distinct keys, {opts.connections} connections, no worker ...")
        progress = asyncio.create_task(_progress(client, keys, n))
        try:
            load, cpu0, cpu1 = await core.phase_cold_load(copts, api, meter, docs)
        finally:
            progress.cancel()
        out["put"] = load.summary()
        out["put"]["cpu"] = cpu_breakdown(cpu0, cpu1)
        out["put_per_s"] = round(load.accepted / load.seconds, 1)
        print(f"    {out['put_per_s']:,.0f} PUT/s")
        out["redis_pending"] = redis_costs(client, keys, n, indices, memory0)
        out["stats"] = await stats_latency(api, opts.stats_requests)
        print(
            f"    /v1/stats with {out['stats']['pending']:,} pending: "
            f"p50 {out['stats']['p50_ms']} ms, p99 {out['stats']['p99_ms']} ms"
        )

        print(f"  raw upsert: {n:,} rows, batches of {opts.batch} ...")
        if prefill_rows:
            out["raw"] = await raw_beside(pg, copts, docs)
        else:
            out["raw"] = await core.phase_raw(pg, copts, docs)
        print("  cold drain: one worker ...")
        drain, _ = await core.phase_cold_drain(
            copts, api, group, pg, meter, out["raw"]["rows_per_s"]
        )
        out["drain"] = drain
        print(
            f"    raw {out['raw']['rows_per_s']:,.0f} rows/s, drain "
            f"{drain['rows_per_s'] or 0:,.0f} rows/s ({drain['ratio_to_raw']} x raw)"
        )
        if not drain["ok"]:
            raise RuntimeError(f"cold drain: {drain['persisted_rows']} rows of {n}")
        out["redis_clean"] = redis_costs(client, keys, n, indices, memory0)
        out["postgres"] = await postgres_costs(pg)
        return out
    finally:
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        group.stop_all()


def summary(p: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one point that the table and the chart show."""
    pend, clean, pg = p["redis_pending"], p["redis_clean"], p["postgres"]
    n: int = p["keys"]
    put_cpu, drain_cpu = p["put"]["cpu"], p["drain"]["cpu_drain"]

    def us(cpu: dict[str, float], name: str) -> float:
        return round(float(cpu.get(name, 0.0)) / n * 1e6, 1)

    return {
        "keys": p["keys"],
        "prefill_rows": p["prefill_rows"],
        "put_per_s": p["put_per_s"],
        "drain_rows_per_s": p["drain"]["rows_per_s"],
        "raw_rows_per_s": p["raw"]["rows_per_s"],
        "drain_x_raw": p["drain"]["ratio_to_raw"],
        # CPU per operation moves less with the machine's load than rates do.
        "api_cpu_us_per_put": us(put_cpu, "api-0"),
        "redis_cpu_us_per_put": us(put_cpu, "redis"),
        "machine_other_us_per_put": us(put_cpu, "other"),
        "worker_cpu_us_per_row": us(drain_cpu, "worker-0"),
        "redis_cpu_us_per_row": us(drain_cpu, "redis"),
        "pg_cpu_us_per_row": us(drain_cpu, "postgres_backends"),
        "doc_bytes": p["doc_bytes_mean"],
        "stored_doc_bytes": pend["entry"]["stored_doc_bytes_mean"],
        "redis_entry_bytes_pending": pend["entry"]["bytes_mean"],
        "redis_queue_bytes_per_record": pend["structures_bytes_per_record"],
        "redis_entry_queue_pending": pend["entry_plus_structures_per_record"],
        "redis_used_per_record_pending": pend["used_memory_delta_per_record"],
        "redis_entry_bytes_clean": clean["entry"]["bytes_mean"],
        "redis_used_per_record_clean": clean["used_memory_delta_per_record"],
        "pg_heap_per_row": pg["heap_per_row"],
        "pg_index_per_row": pg["index_per_row"],
        "pg_total_per_row": pg["total_per_row"],
        "pg_rows": pg["rows"],
        "stats_p50_ms": p["stats"]["p50_ms"],
        "stats_p99_ms": p["stats"]["p99_ms"],
    }


# --------------------------------------------------------------------------- deletes


async def delete_load(ctx: Ctx, k: int) -> dict[str, Any]:
    """K keys PUT and then DELETEd (worker running), twice over the same keys: tombstone
    rows and bytes after each round; then a worker started with
    TOMBSTONE_RETENTION_DAYS=0, whose start-up sweep runs the garbage collection."""
    client, pg = ctx.redis, ctx.pg
    drop_prefix(client, PREFIX)
    await pg.execute("TRUNCATE records, tombstones")
    group = ProcessGroup(ctx.log_dir / "deletes", ctx.env())
    gc_group = ProcessGroup(ctx.log_dir / "deletes-gc", ctx.env({"TOMBSTONE_RETENTION_DAYS": "0"}))
    keys = Keys(PREFIX)
    docs = [core.document(i, ctx.opts.doc_bytes) for i in range(k)]
    indices = sorted(random.Random(ctx.opts.seed).sample(range(k), min(k, ctx.opts.samples)))
    defaults = Settings.model_fields
    out: dict[str, Any] = {
        "keys": k,
        "settings": {
            name: defaults[name].default
            for name in ("tombstone_retention_days", "sweep_seconds", "tombstone_ttl_seconds")
        },
        "rounds": [],
    }
    api: core.Api | None = None
    try:
        proc, port = group.api()
        api = core.Api(proc, port)
        await api.wait_ready()
        worker = group.worker()
        puts = requests_for(api, "PUT", DELETE_COLLECTION, docs)
        dels = requests_for(api, "DELETE", DELETE_COLLECTION, docs)
        for r in (1, 2):
            print(f"  round {r}: PUT {k:,} keys, drain, DELETE them, drain ...")
            put = await core.run_load(api, puts, list(range(k)), ctx.opts.connections)
            await drained(api, group, 300)
            deleted = await core.run_load(api, dels, list(range(k)), ctx.opts.connections)
            if deleted.statuses[204] != k:
                raise RuntimeError(f"deletes answered {dict(deleted.statuses)}")
            await drained(api, group, 300)
            tomb = await table_sizes(pg, "tombstones")
            out["rounds"].append(
                {
                    "round": r,
                    "put_per_s": round(put.accepted / put.seconds, 1),
                    "delete_per_s": round(k / deleted.seconds, 1),
                    "tombstones": tomb,
                    "records_live_rows": int(await pg.fetchval("SELECT count(*) FROM records")),
                    "records": await table_sizes(pg, "records"),
                    "redis_tombstone_entry": entry_costs(client, keys, DELETE_COLLECTION, indices),
                }
            )
            print(
                f"    {tomb['rows']:,} tombstones, {tomb['total_bytes'] / 1e6:.2f} MB "
                f"({tomb['total_per_row']} B/row)"
            )
        group.stop(worker)
        print("  garbage collection: a worker with TOMBSTONE_RETENTION_DAYS=0 ...")
        before = int(await pg.fetchval("SELECT count(*) FROM tombstones"))
        started = time.monotonic()
        gc_worker = gc_group.worker()

        async def remaining() -> int:
            if not gc_worker.running():
                raise RuntimeError(f"worker exited:\n{gc_worker.tail()}")
            return int(await pg.fetchval("SELECT count(*) FROM tombstones"))

        left = await core.poll(remaining, lambda v: v == 0, 120, 0.2, "tombstone collection")
        gc_s = time.monotonic() - started
        after_gc = await table_sizes(pg, "tombstones")
        await pg.execute("VACUUM tombstones")
        out["gc"] = {
            "before": before,
            "after": left,
            "worker_start_to_collected_s": round(gc_s, 2),
            "sizes_after_gc": after_gc,
            "sizes_after_vacuum": await table_sizes(pg, "tombstones"),
        }
        print(f"    {before:,} -> {left} tombstones {gc_s:.1f} s after the worker's start")
        return out
    finally:
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        gc_group.stop_all()
        group.stop_all()


# --------------------------------------------------------------------------- trims


def trim_experiment(
    entries: list[dict[bytes, bytes]], count: int, clean_ttl_ms: int
) -> dict[str, Any]:
    """What trims Redis bytes per record: the same entries (as the service stores them,
    copied from the run) written ``count`` times into a throwaway Redis, one variant at a
    time; bytes per record from used_memory before and after, so everything (key names,
    the keyspace's hash tables, the expires table) counts."""
    if not entries or count < 1:
        return {}
    doc_max = max(len(e.get(b"d", b"")) for e in entries)
    listpack_value = max(64, (doc_max // 64 + 1) * 64)
    long_names = {b"v": b"version", b"d": b"document", b"p": b"persisted", b"t": b"deleted"}
    variants: list[tuple[str, str, dict[str, Any]]] = [
        ("pending", "as stored while pending (fields v, d, p; no TTL)", {}),
        ("pending_queue", "pending, with its member in the dirty ZSET", {"queue": True}),
        ("clean", "as stored once clean (+ a TTL: an expires-table entry)", {"ttl": True}),
        (
            "listpack",
            f"clean, hash-max-listpack-value {listpack_value} (default 64)",
            {"ttl": True, "listpack": listpack_value},
        ),
        (
            "listpack_pending_queue",
            f"pending with its ZSET member, hash-max-listpack-value {listpack_value}",
            {"queue": True, "listpack": listpack_value},
        ),
        (
            "long_fields",
            "clean, long field names (version, document, persisted)",
            {"ttl": True, "long": True},
        ),
        (
            "string",
            "the document alone as a string (SET, + TTL): the floor",
            {"ttl": True, "string": True},
        ),
    ]
    temp = Path(tempfile.mkdtemp(prefix="wbcache-cost-"))
    server = RedisServer(temp / "redis", appendonly=False)
    server.start()
    out: dict[str, Any] = {"entries": count, "variants": {}}
    try:
        client = redis.Redis.from_url(server.url)
        try:
            out["redis_version"] = cast(dict[str, Any], client.info("server"))["redis_version"]
            keys = Keys(PREFIX)
            stamp = time.time_ns() // 1_000_000
            for name, label, how in variants:
                client.flushall()
                client.config_set("hash-max-listpack-value", how.get("listpack", 64))
                before = used_memory(client)
                pipe = client.pipeline(transaction=False)
                for i in range(count):
                    key = keys.entry(COLLECTION, core.key_name(i))
                    fields = entries[i % len(entries)]
                    if how.get("string"):
                        pipe.set(key, fields[b"d"])
                    elif how.get("long"):
                        pipe.hset(key, mapping={long_names[f]: v for f, v in fields.items()})
                    else:
                        pipe.hset(key, mapping=cast(dict[Any, Any], fields))
                    if how.get("ttl"):
                        pipe.pexpire(key, clean_ttl_ms)
                    if how.get("queue"):
                        pipe.zadd(keys.dirty, {f"{COLLECTION}:{core.key_name(i)}": stamp + i})
                    if len(pipe) >= 2000:
                        pipe.execute()
                pipe.execute()
                sample = keys.entry(COLLECTION, core.key_name(0))
                encoding = client.object("encoding", sample)
                per = (used_memory(client) - before) / count
                out["variants"][name] = {
                    "label": label,
                    "bytes_per_record": round(per, 1),
                    "memory_usage_of_one": client.memory_usage(sample, samples=0),
                    "encoding": encoding.decode() if isinstance(encoding, bytes) else encoding,
                }
        finally:
            client.close()
    finally:
        server.stop()
        shutil.rmtree(temp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- chart


def _keys_label(n: float) -> str:
    for div, suffix in ((1_000_000, "M"), (1_000, "k")):
        if n >= div:
            return f"{n / div:g}{suffix}"
    return f"{n:g}"


def draw_chart(points: list[dict[str, Any]], path: Path) -> str | None:
    """Rates (PUT, cold drain, raw upsert) and bytes per record against keys, both on a
    log x axis. Returns why it drew nothing (matplotlib missing), else None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install -e '.[bench]'): no chart"
    plain = [p for p in points if not p["prefill_rows"]]
    extra = [p for p in points if p["prefill_rows"]]
    xs = [p["keys"] for p in plain]
    fig, (rates, sizes) = plt.subplots(1, 2, figsize=(11, 4.4))
    rate_series = (
        ("put_per_s", "PUT/s (API, 32 conns, no worker)", "tab:blue", "o"),
        ("drain_rows_per_s", "cold drain rows/s (1 worker)", "tab:orange", "s"),
        ("raw_rows_per_s", "raw batched upsert rows/s", "tab:green", "^"),
    )
    for key, label, color, marker in rate_series:
        rates.plot(xs, [p[key] for p in plain], marker=marker, color=color, label=label)
        for p in extra:
            rates.scatter([p["keys"]], [p[key]], marker=marker, facecolors="none", edgecolors=color)
    if extra:
        rows = extra[0]["prefill_rows"]
        label = f"hollow: {_keys_label(rows)} rows already in Postgres"
        rates.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label=label)
    rates.set_yscale("log")
    rates.set_ylabel("per second (log)")
    rates.set_title("Rates against keys written")
    byte_series = (
        ("redis_used_per_record_pending", "Redis pending (used_memory/N)", "tab:red", "o"),
        ("redis_entry_queue_pending", "Redis pending (MEMORY USAGE)", "tab:red", "x"),
        (
            "redis_used_per_record_clean",
            "Redis clean, TTL (used_memory/N)",
            "tab:purple",
            "s",
        ),
        ("pg_total_per_row", "Postgres heap + index per row", "tab:green", "^"),
    )
    for key, label, color, marker in byte_series:
        style = ":" if marker == "x" else "-"
        sizes.plot(
            xs, [p[key] for p in plain], marker=marker, color=color, linestyle=style, label=label
        )
    sizes.axhline(plain[0]["doc_bytes"], color="gray", linestyle="--", label="JSON document")
    top = max(p[key] or 0 for p in plain for key, *_ in byte_series)
    sizes.set_ylim(0, max(top, plain[0]["doc_bytes"]) * 1.6)  # room for the legend
    sizes.set_ylabel("bytes")
    sizes.set_title("Bytes per record")
    for ax in (rates, sizes):
        ax.set_xscale("log")
        ax.set_xticks(xs, [_keys_label(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("distinct keys written (log)")
        ax.grid(True, alpha=0.3)
    rates.legend(fontsize=8)
    sizes.legend(fontsize=7, loc="upper center", ncol=2)
    fig.suptitle("wbcache cost curve (python -m bench.cost)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- report


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


ROWS = (
    ("PUT/s (32 conns, no worker)", "put_per_s", 0),
    ("cold drain rows/s (1 worker)", "drain_rows_per_s", 0),
    ("raw batched upsert rows/s", "raw_rows_per_s", 0),
    ("drain / raw", "drain_x_raw", 2),
    ("API CPU µs per PUT", "api_cpu_us_per_put", 0),
    ("Redis CPU µs per PUT", "redis_cpu_us_per_put", 0),
    ("rest of the machine, µs per PUT", "machine_other_us_per_put", 0),
    ("drain CPU µs/row: worker", "worker_cpu_us_per_row", 0),
    ("drain CPU µs/row: Redis", "redis_cpu_us_per_row", 0),
    ("drain CPU µs/row: Postgres backends", "pg_cpu_us_per_row", 0),
    ("document bytes (sent / stored)", None, 0),
    ("Redis entry bytes, pending (MEMORY USAGE)", "redis_entry_bytes_pending", 0),
    ("Redis queue bytes per pending record", "redis_queue_bytes_per_record", 1),
    ("Redis used_memory delta / N, pending", "redis_used_per_record_pending", 0),
    ("Redis entry bytes, clean (MEMORY USAGE)", "redis_entry_bytes_clean", 0),
    ("Redis used_memory delta / N, clean", "redis_used_per_record_clean", 0),
    ("Postgres heap bytes per row", "pg_heap_per_row", 0),
    ("Postgres index bytes per row", "pg_index_per_row", 0),
    ("Postgres total bytes per row", "pg_total_per_row", 0),
    ("/v1/stats p50 / p99 ms, N pending", None, 0),
)


def render(results: dict[str, Any]) -> str:
    points: list[dict[str, Any]] = results.get("summary", [])
    lines: list[str] = []
    if points:
        header = ["keys written"] + [
            f"{p['keys']:,}" + (f" +{p['prefill_rows']:,} rows" if p["prefill_rows"] else "")
            for p in points
        ]
        rows: list[list[str]] = []
        for label, key, digits in ROWS:
            if key is not None:
                rows.append([label, *(_f(p[key], digits) for p in points)])
            elif label.startswith("document"):
                rows.append(
                    [
                        label,
                        *(f"{_f(p['doc_bytes'])} / {_f(p['stored_doc_bytes'])}" for p in points),
                    ]
                )
            else:
                rows.append(
                    [
                        label,
                        *(
                            f"{_f(p['stats_p50_ms'], 1)} / {_f(p['stats_p99_ms'], 1)}"
                            for p in points
                        ),
                    ]
                )
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(r, widths, strict=True))
                )
            )
        lines.insert(1, "-" * len(lines[0]))
    deletes = results.get("deletes")
    if deletes:
        for r in deletes["rounds"]:
            t = r["tombstones"]
            lines.append(
                f"deletes round {r['round']}: {deletes['keys']:,} keys PUT then DELETEd -> "
                f"{t['rows']:,} tombstones, {_f(t['total_per_row'])} B/row "
                f"(heap {_f(t['heap_per_row'])}, indexes {_f(t['index_per_row'])}); "
                f"Redis tombstone entry {_f(r['redis_tombstone_entry']['bytes_mean'])} B"
            )
        gc = deletes.get("gc")
        if gc:
            lines.append(
                f"tombstone GC (TOMBSTONE_RETENTION_DAYS=0, worker start-up sweep): "
                f"{gc['before']:,} -> {gc['after']:,} rows in "
                f"{gc['worker_start_to_collected_s']} s; "
                f"default retention {deletes['settings']['tombstone_retention_days']} days, "
                "collected about hourly"
            )
    trims = results.get("trims")
    if trims:
        lines.append(f"Redis bytes per record, {trims['entries']:,} entries on a throwaway Redis:")
        for v in trims["variants"].values():
            lines.append(f"  {_f(v['bytes_per_record']):>6} B  {v['encoding']:<9} {v['label']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


async def measure(
    opts: Options, servers: Servers, pg: asyncpg.Connection, log_dir: Path
) -> dict[str, Any]:
    """Every point, the delete-heavy load, the trims, the chart: the section's results."""
    client = redis.Redis.from_url(servers.redis_url)
    ctx = Ctx(opts, servers, client, pg, log_dir)
    results: dict[str, Any] = {
        "config": {
            "points": opts.points,
            "prefill_rows": opts.prefill_rows,
            "doc_bytes": opts.doc_bytes,
            "connections": opts.connections,
            "raw_rounds": opts.raw_rounds,
            "batch": opts.batch,
            "stats_requests": opts.stats_requests,
            "samples": opts.samples,
            "delete_keys": opts.delete_keys,
            "trim_entries": opts.trim_entries,
            "redis_prefix": PREFIX,
            "service_env": opts.service_env,
        },
        "points": [],
        "timings_s": {},
    }
    runs = [(n, 0) for n in opts.points]
    if opts.prefill_rows:
        runs.append((max(opts.points), opts.prefill_rows))
    trim_source: list[dict[bytes, bytes]] = []
    try:
        for n, rows in runs:
            label = f"{n:,} keys" + (f" on {rows:,} rows" if rows else "")
            print(f"cost: point {label} ...")
            started = time.monotonic()
            p = await point(ctx, n, rows)
            results["timings_s"][label] = round(time.monotonic() - started, 1)
            results["points"].append(p)
            if not trim_source:
                names = [
                    Keys(PREFIX).entry(COLLECTION, core.key_name(i)) for i in range(min(n, 1000))
                ]
                pipe = client.pipeline(transaction=False)
                for name in names:
                    pipe.hgetall(name)
                trim_source = [e for e in pipe.execute() if e]
            drop_prefix(client, PREFIX)
        results["summary"] = [summary(p) for p in results["points"]]
        if opts.delete_keys:
            print(f"cost: delete-heavy load, {opts.delete_keys:,} keys ...")
            started = time.monotonic()
            results["deletes"] = await delete_load(ctx, opts.delete_keys)
            results["timings_s"]["deletes"] = round(time.monotonic() - started, 1)
            drop_prefix(client, PREFIX)
        if opts.trim_entries:
            print(f"cost: what trims Redis bytes per record ({opts.trim_entries:,} entries) ...")
            ttl_ms = int(Settings.model_fields["clean_ttl_seconds"].default) * 1000
            results["trims"] = await asyncio.to_thread(
                trim_experiment, trim_source, opts.trim_entries, ttl_ms
            )
        if opts.chart is not None:
            note = draw_chart(results["summary"], opts.chart)
            results["chart"] = note or str(opts.chart)
            print(f"cost: chart {results['chart']}")
        print(render(results))
        return results
    finally:
        with contextlib.suppress(Exception):
            await pg.execute("TRUNCATE records, tombstones")
        client.close()


async def _main_task(opts: Options, servers: Servers, log_dir: Path) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    pg = await asyncpg.connect(servers.database_url)
    try:
        client = redis.Redis.from_url(servers.redis_url)
        try:
            facts = {
                "postgres": await core.pg_facts(pg),
                "redis": core.redis_facts(client),
                "background_cpu_busy": await core.background_busy(),
                "load_average_before": [round(v, 2) for v in os.getloadavg()],
            }
        finally:
            client.close()
        return {**facts, **await measure(opts, servers, pg, log_dir)}
    finally:
        await pg.close()
        loop.remove_signal_handler(signal.SIGTERM)


def report(path: Path, chart: Path | None) -> int:
    """Print a finished run's table again (``--report FILE``) and redraw its chart."""
    results = json.loads(path.read_text())
    measured = results.get("cost", results)  # a suite's JSON holds the section under "cost"
    measured["summary"] = [summary(p) for p in measured.get("points", [])]
    print(render(measured))
    if chart is not None and measured.get("summary"):
        note = draw_chart(measured["summary"], chart)
        print(note or f"chart: {chart}")
    return 0


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report", type=Path)
    known, rest = pre.parse_known_args(argv)
    opts = parse_args(rest)
    if known.report is not None:
        return report(known.report, opts.chart)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = opts.results_dir / f"cost-{stamp}-logs"
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    revision = core.git_revision()  # at the start: the code that ran, not HEAD at the end
    started = time.monotonic()
    servers: Servers | None = None
    try:
        servers = start_servers(opts.redis_url, opts.database_url)
        for note in servers.notes:
            print(note)
        core.prepare(core_options(opts, servers, 1), servers)
        with asyncio.Runner(loop_factory=core._new_loop) as runner:
            measured = runner.run(_main_task(opts, servers, log_dir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every process the benchmark started is stopped", file=sys.stderr)
        return 130
    finally:
        if servers is not None:
            servers.close()
    results = {
        "started_at": started_at,
        "git": revision,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "servers": {
            "redis": core._safe_url(servers.redis_url),
            "database": core._safe_url(servers.database_url),
            "throwaway_servers": servers.notes,
        },
        **measured,
        "wall_s": round(time.monotonic() - started, 1),
        "logs": str(log_dir),
    }
    out = opts.results_dir / f"cost-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"wbcache cost curve  {started_at}  git {results['git']}  {os.cpu_count()} CPUs  "
        f"PostgreSQL {results['postgres']['version']}  Redis {results['redis']['version']}  "
        f"(machine {results['background_cpu_busy']:.0%} busy before start), "
        f"{results['wall_s']:,.0f} s"
    )
    print(f"results: {out}")
    print(f"logs:    {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
