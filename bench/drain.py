"""The cold drain alone, side by side with the raw upsert, repeated: ``python -m bench.drain``.

bench.core measures the cold drain once per run, after a 30-90 s load through the API; this
measures only the drain, several times in one run, for comparing changes to the flush path:

* load: N dirty keys written straight into Redis by the service's write script (pipelined,
  no API; the same entries, dirty marks and pending counts a PUT leaves);
* raw: bench.core's raw upsert of the same rows (one connection, batches of 1,000);
* drain: the service's ``Flusher.drain_ready()`` in this process (uvloop, default settings
  or ``--service-env``), as the worker's flush job runs it, from the first claim until
  nothing is pending.

Raw and drain alternate (the order rotated between repetitions); each repetition's ratio is
drain / raw of that repetition, and the report gives medians. CPU per persisted row of
this process (the worker's part), Redis (INFO cpu: with ``--private-redis`` a throwaway
redis-server of its own, so nothing else's commands count) and the database's Postgres
backends; with ``--commandstats`` (private Redis only) Redis' per-command times, scripts and
the commands they call. ``--py-spy DIR``: a folded profile of this process per drain.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import asyncpg
import redis
import uvloop

from bench.core import RAW_UPSERT, document, key_name
from bench.env import database_name, redis_cpu_seconds, start_servers
from service.adapters.migrate import migrate
from service.adapters.postgres import PgPool
from service.adapters.redis import close_redis, connect_redis
from service.config import Settings
from service.core.flusher import Flusher
from service.core.scripts import Scripts
from service.dev.embedded import RedisServer
from service.dev.processes import cpu_seconds

PREFIX = "wbdrain:"
COLLECTION = "cold"
RAW_COLLECTION = "raw"
LOAD_PIPELINE = 500


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n")[0])
    p.add_argument("--keys", type=int, default=50_000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--doc-bytes", type=int, default=200)
    p.add_argument("--batch", type=int, default=1000, help="raw upsert rows per statement")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/6", help="FLUSHED")
    p.add_argument(
        "--database-url",
        default="postgresql://postgres@127.0.0.1:5432/wbcache_bench_drain",
        help="records TRUNCATED; the name must contain 'bench'",
    )
    p.add_argument("--private-redis", action="store_true", help="a throwaway redis-server")
    p.add_argument("--commandstats", action="store_true", help="Redis per-command times")
    p.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--py-spy", metavar="DIR", help="folded py-spy profiles of each drain")
    opts = p.parse_args(argv)
    if "bench" not in database_name(opts.database_url):
        p.error("the database's name must contain 'bench'")
    if opts.commandstats and not opts.private_redis:
        p.error("--commandstats resets Redis' statistics: only with --private-redis")
    return opts


def settings_for(opts: argparse.Namespace, redis_url: str) -> Settings:
    extra = dict(item.split("=", 1) for item in opts.service_env)
    fields = {k.lower(): v for k, v in extra.items()}
    return Settings(
        redis_url=redis_url,
        database_url=opts.database_url,
        redis_prefix=PREFIX,
        write_delay_ms=0,
        **fields,
    )


async def load(flusher: Flusher, docs: list[bytes], tag: int) -> None:
    """Every key dirty, as a PUT of a key Postgres does not hold leaves it."""
    write = flusher.scripts.write
    n = len(docs)
    for lo in range(0, n, LOAD_PIPELINE):
        async with flusher.redis.pipeline(transaction=False) as pipe:
            for i in range(lo, min(n, lo + LOAD_PIPELINE)):
                m = f"{COLLECTION}:{key_name(i)}"
                shard = flusher.shards.for_member(m)
                await write(
                    keys=[
                        shard.member_entry(m),
                        shard.dirty,
                        shard.inflight,
                        shard.wake,
                        shard.dead,
                        shard.pending_counts,
                        shard.key_filter(8),
                        shard.key_filter_origin(8),
                        shard.pending_keys,
                    ],
                    args=["put", docs[i], m, 0, "", 0, "", "", 1, tag, 0, 60_000, 0, ""],
                    client=pipe,  # type: ignore[arg-type]
                )
            await pipe.execute()


async def raw(pg: asyncpg.Connection, docs: list[bytes], batch: int) -> tuple[float, float]:
    """(rows/s, µs of Postgres CPU per row) of bench.core's raw upsert."""
    await pg.execute("TRUNCATE records, tombstones")
    version = time.time_ns() // 1000
    pid = int(await pg.fetchval("SELECT pg_backend_pid()"))
    cpu0 = cpu_seconds(pid)
    started = time.perf_counter()
    for lo in range(0, len(docs), batch):
        hi = min(len(docs), lo + batch)
        await pg.execute(
            RAW_UPSERT,
            [RAW_COLLECTION] * (hi - lo),
            [key_name(i) for i in range(lo, hi)],
            [docs[i].decode() for i in range(lo, hi)],
            [version] * (hi - lo),
        )
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(pid) - cpu0
    await pg.execute("TRUNCATE records, tombstones")
    return len(docs) / seconds, cpu / len(docs) * 1e6


async def backend_pids(pg: asyncpg.Connection) -> list[int]:
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    return [int(r["pid"]) for r in rows]


def commandstats(client: redis.Redis) -> dict[str, tuple[int, float]]:
    info: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {k.removeprefix("cmdstat_"): (v["calls"], v["usec"]) for k, v in info.items()}


async def drain(
    opts: argparse.Namespace,
    flusher: Flusher,
    pg: asyncpg.Connection,
    sync_redis: redis.Redis,
    docs: list[bytes],
) -> dict[str, Any]:
    await pg.execute("TRUNCATE records, tombstones")
    await load(flusher, docs, tag=0)
    pids = await backend_pids(pg)
    profiler = None
    if opts.py_spy:
        out = Path(opts.py_spy) / f"drain-{time.strftime('%H%M%S')}.folded"
        profiler = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid())]
            + ["--rate", "250", "--nonblocking", "--format", "raw", "--nolineno", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await asyncio.sleep(1.0)
    if opts.commandstats:
        sync_redis.config_resetstat()
    pg0 = {pid: cpu_seconds(pid) for pid in pids}
    redis0 = redis_cpu_seconds(sync_redis)
    me0 = time.process_time()
    started = time.perf_counter()
    flushed = await flusher.drain_ready()
    seconds = time.perf_counter() - started
    me = time.process_time() - me0
    redis_cpu = redis_cpu_seconds(sync_redis) - redis0
    # A backend the pool opened during the drain started from 0.
    pids = sorted(set(pids) | set(await backend_pids(pg)))
    pg_cpu = sum(max(0.0, cpu_seconds(pid) - pg0.get(pid, 0.0)) for pid in pids)
    stats = commandstats(sync_redis) if opts.commandstats else {}
    if profiler is not None:
        profiler.send_signal(2)
        profiler.wait(10)
    count = await pg.fetchval("SELECT count(*) FROM records WHERE collection = $1", COLLECTION)
    counts = cast(list[bytes], sync_redis.hvals(flusher.shards.any.pending_counts))
    pending = sum(int(v) for v in counts)
    if count != len(docs) or flushed != len(docs) or pending:
        raise RuntimeError(f"drain: {count} rows, {flushed} flushed, {pending} pending")
    n = len(docs)
    return {
        "rows_per_s": n / seconds,
        "worker_us": me / n * 1e6,
        "redis_us": redis_cpu / n * 1e6,
        "pg_us": pg_cpu / n * 1e6,
        "commandstats": stats,
    }


async def run(opts: argparse.Namespace, redis_url: str) -> None:
    settings = settings_for(opts, redis_url)
    sync_redis = redis.Redis.from_url(redis_url)
    sync_redis.flushdb()
    pg = await asyncpg.connect(opts.database_url)
    client = connect_redis("worker", settings)
    pool = PgPool("worker", settings)
    flusher = Flusher(client, pool, settings, Scripts.register(client))
    docs = [document(i, opts.doc_bytes) for i in range(opts.keys)]
    raws: list[float] = []
    raw_pg: list[float] = []
    drains: list[dict[str, Any]] = []
    try:
        await (await pool.get()).execute("SELECT 1")
        for rep in range(opts.reps):
            order = ("raw", "drain") if rep % 2 == 0 else ("drain", "raw")
            for what in order:
                if what == "raw":
                    rate, pg_us = await raw(pg, docs, opts.batch)
                    raws.append(rate)
                    raw_pg.append(pg_us)
                else:
                    sync_redis.flushdb()
                    drains.append(await drain(opts, flusher, pg, sync_redis, docs))
            d = drains[-1]
            print(
                f"rep {rep + 1}: raw {raws[-1]:,.0f} rows/s (postgres {raw_pg[-1]:.1f} µs/row),"
                f" drain {d['rows_per_s']:,.0f} rows/s, ratio {d['rows_per_s'] / raws[-1]:.2f};"
                f" CPU µs/row worker {d['worker_us']:.1f} redis {d['redis_us']:.1f}"
                f" postgres {d['pg_us']:.1f}",
                flush=True,
            )
    finally:
        await pg.close()
        await pool.close()
        await close_redis(client)
    ratios = [d["rows_per_s"] / r for d, r in zip(drains, raws, strict=True)]

    def med(name: str) -> float:
        return float(statistics.median(d[name] for d in drains))

    print(
        f"median of {opts.reps}: raw {statistics.median(raws):,.0f} rows/s (postgres"
        f" {statistics.median(raw_pg):.1f} µs/row), drain"
        f" {med('rows_per_s'):,.0f} rows/s, ratio {statistics.median(ratios):.2f}"
        f" (range {min(ratios):.2f}-{max(ratios):.2f}); CPU µs/row worker {med('worker_us'):.1f}"
        f" redis {med('redis_us'):.1f} postgres {med('pg_us'):.1f}"
    )
    if opts.commandstats:
        stats = drains[-1]["commandstats"]
        n = opts.keys
        print("Redis, last drain: command calls/row µs/row")
        for name, (calls, usec) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
            if usec / n >= 0.05:
                print(f"  {name:<24} {calls / n:6.2f} {usec / n:7.2f}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    private: RedisServer | None = None
    temp = None
    redis_url = opts.redis_url
    servers = None
    try:
        if opts.private_redis:
            temp = tempfile.TemporaryDirectory(prefix="wbcache-drain-")
            private = RedisServer(Path(temp.name), appendonly=False)
            private.start()
            redis_url = private.url
        else:
            servers = start_servers(opts.redis_url, opts.database_url)
            redis_url = servers.redis_url
        migrate(opts.database_url)
        uvloop.run(run(opts, redis_url))
    finally:
        if private is not None:
            private.stop()
        if servers is not None:
            servers.close()
        if temp is not None:
            temp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
