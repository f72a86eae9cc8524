"""A standalone Redis vs a 3-primary Redis Cluster, side by side in one run:
``python -m bench.cluster``.

Targets, each with its own throwaway Redis (AOF on, ``appendfsync everysec``, as
production runs) and its own ``wbcache serve``, all on the same Postgres database:

* ``standalone``: one Redis (REDIS_SHARDS default: 1; arq's wake-up jobs in the same Redis);
* ``cluster rN``: ``ClusterTopology`` with 3 primaries and N replicas each
  (``--cluster-replicas``, default 0: the routing cost alone, without replication
  traffic on this 2-core machine), REDIS_SHARDS default (16 on a Cluster), ARQ_REDIS_URL
  a small standalone Redis of its own.

Measured, repetitions with the order of the targets rotated and medians reported:

1. PUT: every key of the keyspace PUT once, then per connection count a discarded
   warm-up per target and bench/suite.py's ``wrk`` PUT run; ``--put-workers`` (1) workers
   per target run throughout. req/s, p50, p99, and CPU per PUT of the API, the worker and
   all Redis processes of the target (psutil, user + sys), from wrk's start until
   ``pending == 0`` after it (the worker's share of what the run left pending counts, as
   in bench.suite).
2. Cold drain: ``--drain-workers`` (2) workers per target, started beforehand and paused
   (SIGSTOP); ``--drain-keys`` new keys loaded through ``POST /v1/batch`` (load writes/s
   and CPU per write); once every key is due (WRITE_DELAY_MS), the workers resume
   (SIGCONT) and the time until ``pending == 0`` is taken: keys/s, and CPU per flushed key
   of the workers, all Redis processes and the Postgres backends.

See bench/README.md, "Standalone Redis vs Redis Cluster".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench import core
from bench.env import ProcessGroup, service_env, system_cpu_seconds
from bench.http import Connection, encode_request
from bench.suite import (
    DEFAULT_DATABASE_URL,
    RESULTS_DIR,
    Options,
    Target,
    parse_args,
    prefill,
    wait_drained,
    wait_http,
    wait_workers,
    wrk,
)
from service.adapters.migrate import migrate
from service.config import Settings
from service.dev.cluster import ClusterTopology
from service.dev.processes import cpu_seconds
from service.dev.redis_server import RedisServer

PREFIX = "wbcl:"
STANDALONE = "standalone"
BATCH_HEADERS = (("Content-Type", "application/json"),)


@dataclass
class Side:
    """One target: the Redis processes it runs on, its services and their settings."""

    name: str
    redis_url: str
    redis: list[RedisServer]  # every redis-server of the target (cluster nodes, arq's)
    env: dict[str, str]
    group: ProcessGroup
    target: Target | None = None

    @property
    def t(self) -> Target:
        assert self.target is not None
        return self.target


@dataclass
class Cpu:
    """CPU seconds so far of a target's processes, its database's backends, the machine."""

    api: float
    worker: float
    redis: float
    postgres: dict[int, float]
    busy: float
    total: float


async def sample(side: Side, pg: asyncpg.Connection) -> Cpu:
    rows = await pg.fetch("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    busy, total = system_cpu_seconds()
    t = side.t
    return Cpu(
        api=sum(cpu_seconds(p.pid) for p in t.api if p.running()),
        worker=sum(cpu_seconds(p.pid) for p in t.workers if p.running()),
        redis=sum(cpu_seconds(pid) for s in side.redis if (pid := s.pid) is not None),
        postgres={int(r["pid"]): cpu_seconds(int(r["pid"])) for r in rows},
        busy=busy,
        total=total,
    )


def per_item(a: Cpu, b: Cpu, n: int) -> dict[str, float]:
    """µs of CPU per item between two samples, and the machine's busy share meanwhile.
    A process started in between counts from 0; one that ended is lost (sample first)."""
    pg = sum(max(0.0, v - a.postgres.get(pid, 0.0)) for pid, v in b.postgres.items())
    n = max(1, n)
    return {
        "api_us": round((b.api - a.api) / n * 1e6, 1),
        "worker_us": round((b.worker - a.worker) / n * 1e6, 1),
        "redis_us": round((b.redis - a.redis) / n * 1e6, 1),
        "postgres_us": round(pg / n * 1e6, 1),
        "machine_busy": round((b.busy - a.busy) / (b.total - a.total), 3)
        if b.total > a.total
        else 0.0,
    }


async def stats(conn: Connection, port: int) -> dict[str, Any]:
    status, body = await conn.send(encode_request("GET", "/v1/stats", f"127.0.0.1:{port}"))
    if status != 200:
        raise RuntimeError(f"/v1/stats answered {status}: {body[:200]!r}")
    result: dict[str, Any] = orjson.loads(body)
    return result


# --------------------------------------------------------------------------- targets


async def start_side(side: Side, workers: int) -> None:
    proc, port = side.group.api()
    side.target = Target(side.name, port, "bench", [proc], wbcache=True, prefix=PREFIX)
    await wait_http(proc, port, "/readyz")
    await add_workers(side, workers)


async def add_workers(side: Side, n: int) -> None:
    for _ in range(n):
        side.t.workers.append(side.group.worker())
    await wait_workers(side.t)


def stop_workers(side: Side) -> None:
    for w in side.t.workers:
        w.stop()
    side.t.workers.clear()


async def settled(t: Target) -> float:
    """Seconds until nothing is pending; 0 at once when the target runs no worker."""
    return await wait_drained(t) if t.workers else 0.0


def rotations(sides: list[Side], reps: int) -> list[list[Side]]:
    """The targets' order per repetition, rotated (with two: alternated)."""
    return [sides[r % len(sides) :] + sides[: r % len(sides)] for r in range(reps)]


# --------------------------------------------------------------------------- PUT


async def put_run(
    side: Side, pg: asyncpg.Connection, c: int, seconds: float, opts: Options, log: Path
) -> dict[str, Any]:
    """One wrk PUT run; CPU per PUT from its start until the worker has flushed it all."""
    t = side.t
    conn = Connection("127.0.0.1", t.port)
    try:
        s0 = await stats(conn, t.port)
        cpu0 = await sample(side, pg)
        r = await wrk(t.port, "put", c, seconds, t.collection, opts, log)
        r["drain_after_s"] = round(await settled(t), 2)
        cpu1 = await sample(side, pg)
        s1 = await stats(conn, t.port)
    finally:
        await conn.close()
    r.update(per_item(cpu0, cpu1, r["requests"]))
    flushed, batches = s1["flushed"] - s0["flushed"], s1["flush_batches"] - s0["flush_batches"]
    r["flushed_per_put"] = round(flushed / max(1, r["requests"]), 3)
    r["keys_per_batch"] = round(flushed / max(1, batches), 1)
    return r


async def put_phase(
    a: argparse.Namespace, sides: list[Side], pg: asyncpg.Connection, opts: Options, log: Path
) -> list[dict[str, Any]]:
    for side in sides:
        print(f"prefill {side.name}: PUT {a.keys:,} keys once ...")
        await prefill(side.t, a.keys, opts.doc_bytes)
        await settled(side.t)
    await pg.execute("VACUUM ANALYZE records")
    runs: list[dict[str, Any]] = []
    for c in a.connections:
        for side in sides:  # warm-up, discarded
            await wrk(side.t.port, "put", c, a.warmup, side.t.collection, opts, log)
            await settled(side.t)
        for rep, order in enumerate(rotations(sides, a.reps)):
            for side in order:
                r = await put_run(side, pg, c, a.duration, opts, log)
                r.update(target=side.name, connections=c, rep=rep)
                runs.append(r)
                print(
                    f"  PUT c{c} rep {rep} {side.name:<12} {r['rps']:>7,.0f} req/s  "
                    f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  µs/PUT: "
                    f"api {r['api_us']:.0f} redis {r['redis_us']:.0f} "
                    f"worker {r['worker_us']:.0f}  busy {r['machine_busy']:.0%}"
                    + (f"  non-2xx {r['non_2xx_3xx']}" if r["non_2xx_3xx"] else "")
                )
    return runs


# --------------------------------------------------------------------------- cold drain


async def batch_load(
    port: int, collection: str, n: int, doc_bytes: int, ops: int, connections: int
) -> float:
    """PUT keys 0..n-1 of ``collection`` through ``POST /v1/batch``, ``ops`` per request;
    writes/s. Every operation must be answered 200/201."""
    host = f"127.0.0.1:{port}"
    chunks = iter(range(0, n, ops))
    bad: Counter[int] = Counter()
    first_error: list[Any] = []

    async def client() -> None:
        conn = Connection("127.0.0.1", port)
        try:
            for lo in chunks:
                body = orjson.dumps(
                    {
                        "operations": [
                            {
                                "op": "put",
                                "collection": collection,
                                "key": core.key_name(i),
                                "document": orjson.Fragment(core.document(i, doc_bytes)),
                            }
                            for i in range(lo, min(n, lo + ops))
                        ]
                    }
                )
                status, answer = await conn.send(
                    encode_request("POST", "/v1/batch", host, body, BATCH_HEADERS)
                )
                if status != 200:
                    bad[status] += 1
                    first_error[:] = first_error or [answer[:300]]
                    continue
                for result in orjson.loads(answer)["results"]:
                    if result["status"] not in (200, 201):
                        bad[result["status"]] += 1
                        first_error[:] = first_error or [result]
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = time.monotonic() - started
    if bad:
        raise RuntimeError(f"batch load answered {dict(bad)}; first: {first_error[0]}")
    return n / seconds


def signal_workers(side: Side, sig: signal.Signals) -> None:
    """``sig`` to every worker's process group (its session: the worker and children)."""
    for w in side.t.workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.pid, sig)


async def drain_run(
    a: argparse.Namespace, side: Side, pg: asyncpg.Connection, rep: int, doc_bytes: int
) -> dict[str, Any]:
    """With the target's workers paused (SIGSTOP), load ``a.drain_keys`` new keys; once
    all are due (WRITE_DELAY_MS), resume the workers (SIGCONT) and time them until
    ``pending == 0``. Paused rather than started: their Python start-up (about a second
    and as much CPU each) is not in the rate nor in the CPU per key."""
    t = side.t
    collection = f"cold{rep}"
    n = a.drain_keys
    await pg.execute("TRUNCATE records, tombstones")
    conn = Connection("127.0.0.1", t.port)
    signal_workers(side, signal.SIGSTOP)
    try:
        cpu0 = await sample(side, pg)
        load_rate = await batch_load(
            t.port, collection, n, doc_bytes, a.batch_ops, a.load_connections
        )
        cpu1 = await sample(side, pg)
        s0 = await stats(conn, t.port)
        if s0["pending"] < n:
            raise RuntimeError(f"{side.name}: {s0['pending']} pending after loading {n}")
        await asyncio.sleep(a.write_delay_ms / 1000 + 0.2)  # every key due: no waiting
        cpu2 = await sample(side, pg)
        resumed = time.monotonic()
        signal_workers(side, signal.SIGCONT)
        deadline = resumed + max(120.0, n / 200)
        while True:
            s = await stats(conn, t.port)
            if s["pending"] == 0:
                break
            for w in t.workers:
                if not w.running():
                    raise RuntimeError(f"{w.name} exited:\n{w.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{side.name}: pending {s['pending']} after the deadline")
            await asyncio.sleep(0.05)
        drain_s = time.monotonic() - resumed
        cpu3 = await sample(side, pg)
    finally:
        signal_workers(side, signal.SIGCONT)
        await conn.close()
    persisted = int(
        await pg.fetchval("SELECT count(*) FROM records WHERE collection = $1", collection)
    )
    if persisted != n or s["dead_letters"]:
        raise RuntimeError(f"{side.name}: {persisted} of {n} persisted, {s['dead_letters']} DLQ")
    load = per_item(cpu0, cpu1, n)
    drain = per_item(cpu2, cpu3, n)
    batches = s["flush_batches"] - s0["flush_batches"]
    return {
        "keys": n,
        "load_writes_per_s": round(load_rate, 1),
        "load_api_us": load["api_us"],
        "load_redis_us": load["redis_us"],
        "load_postgres_us": load["postgres_us"],
        "load_machine_busy": load["machine_busy"],
        "drain_s": round(drain_s, 3),
        "drain_keys_per_s": round(n / drain_s, 1),
        "keys_per_batch": round((s["flushed"] - s0["flushed"]) / max(1, batches), 1),
        "drain_worker_us": drain["worker_us"],
        "drain_redis_us": drain["redis_us"],
        "drain_postgres_us": drain["postgres_us"],
        "drain_api_us": drain["api_us"],  # /v1/stats polled every 50 ms
        "drain_machine_busy": drain["machine_busy"],
    }


async def drain_phase(
    a: argparse.Namespace, sides: list[Side], pg: asyncpg.Connection, doc_bytes: int
) -> list[dict[str, Any]]:
    for side in sides:
        stop_workers(side)
        await add_workers(side, a.drain_workers)
        await wait_drained(side.t)  # what the PUT phase left, if it ran without workers
    await asyncio.sleep(1)  # the workers' first sweep done: idle
    runs: list[dict[str, Any]] = []
    for rep, order in enumerate(rotations(sides, a.drain_reps)):
        for side in order:
            r = await drain_run(a, side, pg, rep, doc_bytes)
            r.update(target=side.name, rep=rep)
            runs.append(r)
            print(
                f"  drain rep {rep} {side.name:<12} load {r['load_writes_per_s']:>7,.0f} "
                f"writes/s; {a.drain_workers} workers {r['drain_keys_per_s']:>7,.0f} keys/s "
                f"({r['drain_s']:.2f} s); µs/key: worker {r['drain_worker_us']:.0f} redis "
                f"{r['drain_redis_us']:.0f} postgres {r['drain_postgres_us']:.0f}  "
                f"{r['keys_per_batch']:.0f} keys/flush  busy {r['drain_machine_busy']:.0%}"
            )
    return runs


# --------------------------------------------------------------------------- summary


def medians(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"reps": len(runs)}
    for k in keys:
        values = [r[k] for r in runs]
        out[k] = round(statistics.median(values), 2)
        out[f"{k}_range"] = [min(values), max(values)]
    return out


PUT_KEYS = (
    *("rps", "p50_ms", "p99_ms", "api_us", "redis_us", "worker_us"),
    *("flushed_per_put", "keys_per_batch", "machine_busy"),
)
DRAIN_KEYS = (
    *("load_writes_per_s", "load_api_us", "load_redis_us", "drain_keys_per_s"),
    *("drain_s", "drain_worker_us", "drain_redis_us"),
    *("drain_postgres_us", "keys_per_batch", "drain_machine_busy"),
)


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    names = results["targets"]
    put: dict[str, Any] = {}
    for c in results["config"]["connections"]:
        for name in names:
            rs = [r for r in results["put_runs"] if r["target"] == name and r["connections"] == c]
            if rs:
                put[f"c{c} {name}"] = medians(rs, PUT_KEYS) | {
                    "non_2xx_3xx": sum(r["non_2xx_3xx"] + r["socket_errors"] for r in rs)
                }
    drain: dict[str, Any] = {}
    for name in names:
        if rs := [r for r in results["drain_runs"] if r["target"] == name]:
            drain[name] = medians(rs, DRAIN_KEYS)
    return {"put": put, "drain": drain}


def markdown(results: dict[str, Any]) -> str:
    cfg, s = results["config"], results["summary"]
    lines: list[str] = []
    if s["put"]:
        lines += _put_table(cfg, s["put"])
    if s["drain"]:
        lines += _drain_table(cfg, s["drain"])
    return "\n".join(lines)


def _put_table(cfg: dict[str, Any], put: dict[str, Any]) -> list[str]:
    lines = [
        f"PUT, wrk -t1, {cfg['keys']:,} keys, medians of {cfg['reps']} x {cfg['duration']:g} s "
        f"(req/s range in brackets); CPU µs per PUT until pending 0",
        "",
        "| conns | target | req/s | p50 ms | p99 ms | API µs/PUT | Redis µs/PUT "
        "| worker µs/PUT | keys/flush | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, e in put.items():
        c, name = key.split(" ", 1)
        lo, hi = e["rps_range"]
        lines.append(
            f"| {c[1:]} | {name} | {e['rps']:,.0f} ({lo:,.0f}-{hi:,.0f}) | {e['p50_ms']:.1f} "
            f"| {e['p99_ms']:.1f} | {e['api_us']:.0f} | {e['redis_us']:.0f} "
            f"| {e['worker_us']:.0f} | {e['keys_per_batch']:.0f} | {e['non_2xx_3xx']} |"
        )
    return [*lines, ""]


def _drain_table(cfg: dict[str, Any], drain: dict[str, Any]) -> list[str]:
    lines = [
        f"Cold drain: {cfg['drain_keys']:,} keys loaded through POST /v1/batch "
        f"({cfg['batch_ops']} puts each, {cfg['load_connections']} connections) with the "
        f"workers paused, then {cfg['drain_workers']} workers resumed until pending 0; "
        f"medians of {cfg['drain_reps']} (keys/s range in brackets)",
        "",
        "| target | load writes/s | load API µs/write | load Redis µs/write | drain keys/s "
        "| resume -> 0 s | worker µs/key | Redis µs/key | Postgres µs/key "
        "| keys/flush |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, e in drain.items():
        lo, hi = e["drain_keys_per_s_range"]
        lines.append(
            f"| {name} | {e['load_writes_per_s']:,.0f} | {e['load_api_us']:.0f} "
            f"| {e['load_redis_us']:.0f} | {e['drain_keys_per_s']:,.0f} ({lo:,.0f}-{hi:,.0f}) "
            f"| {e['drain_s']:.2f} | {e['drain_worker_us']:.0f} "
            f"| {e['drain_redis_us']:.0f} | {e['drain_postgres_us']:.0f} "
            f"| {e['keys_per_batch']:.0f} |"
        )
    return lines


# --------------------------------------------------------------------------- run


async def run(a: argparse.Namespace, base: Path, log_dir: Path) -> dict[str, Any]:
    extra = dict(a.service_env)
    servers: list[RedisServer] = []
    clusters: list[ClusterTopology] = []
    sides: list[Side] = []
    pg: asyncpg.Connection | None = None
    try:
        standalone = RedisServer(base / STANDALONE, appendonly=True)
        servers.append(standalone)
        await asyncio.to_thread(standalone.start)
        env = service_env(standalone.url, a.database_url, PREFIX, extra)
        sides.append(
            Side(STANDALONE, standalone.url, [standalone], env, ProcessGroup(log_dir / "s", env))
        )
        for r in a.cluster_replicas:
            name = f"cluster r{r}"
            cluster = ClusterTopology(base / f"cluster-r{r}", primaries=3, replicas_per_primary=r)
            clusters.append(cluster)
            await asyncio.to_thread(cluster.start)
            arq = RedisServer(base / f"arq-r{r}", appendonly=True)
            servers.append(arq)
            await asyncio.to_thread(arq.start)
            env = service_env(cluster.url, a.database_url, PREFIX, {"ARQ_REDIS_URL": arq.url})
            env.update(extra)
            if a.cluster_shards is not None:
                env["REDIS_SHARDS"] = str(a.cluster_shards)
            group = ProcessGroup(log_dir / f"cluster-r{r}", env)
            sides.append(Side(name, cluster.url, [*cluster.nodes, arq], env, group))
        await asyncio.to_thread(migrate, a.database_url)
        pg = await asyncpg.connect(a.database_url)
        await pg.execute("TRUNCATE records, tombstones")
        busy_before = await core.background_busy()
        load_before = os.getloadavg()
        # bench.suite's wrk() takes its keyspace and document size from suite Options.
        opts = parse_args(
            ["--sections", "drain", "--keys", str(a.keys), "--database-url", a.database_url]
        )
        for side in sides:
            await start_side(side, workers=a.put_workers)
        put_runs: list[dict[str, Any]] = []
        drain_runs: list[dict[str, Any]] = []
        if "put" in a.phases:
            print(f"PUT: {', '.join(s.name for s in sides)}; connections {a.connections}")
            put_runs = await put_phase(a, sides, pg, opts, log_dir / "wrk.log")
        if "drain" in a.phases:
            print(f"cold drain: {a.drain_keys:,} keys, {a.drain_workers} workers")
            drain_runs = await drain_phase(a, sides, pg, opts.doc_bytes)
        return {
            "targets": [s.name for s in sides],
            "redis_urls": {s.name: s.redis_url for s in sides},
            "redis_processes": {s.name: len(s.redis) for s in sides},
            "service_env": {
                s.name: {
                    k: v for k, v in s.env.items() if k in ("ARQ_REDIS_URL", "REDIS_SHARDS", *extra)
                }
                for s in sides
            },
            "postgres_version": await pg.fetchval("SHOW server_version"),
            "background_cpu_busy": busy_before,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "put_runs": put_runs,
            "drain_runs": drain_runs,
        }
    finally:
        if pg is not None:
            await pg.close()
        for side in sides:
            side.group.stop_all()
        for cluster in clusters:
            cluster.stop()
        for server in servers:
            server.stop()


async def _main_task(a: argparse.Namespace, base: Path, log_dir: Path) -> dict[str, Any]:
    """``run``, cancelled on SIGTERM: its ``finally`` stops every server and process."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run(a, base, log_dir)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    p.add_argument("--quick", action="store_true", help="short runs, one repetition: a smoke run")
    p.add_argument("--phases", default="put,drain", help="put, drain or both (put,drain)")
    p.add_argument("--connections", default="32,128", help="wrk connection counts (32,128)")
    p.add_argument("--duration", type=float, help="seconds per measured wrk run (8)")
    p.add_argument("--warmup", type=float, help="seconds of discarded warm-up (2)")
    p.add_argument("--reps", type=int, help="repetitions of the PUT runs (3)")
    p.add_argument("--keys", type=int, help="keyspace of the PUT runs (10000)")
    p.add_argument("--drain-keys", type=int, help="keys of each cold drain (50000)")
    p.add_argument("--drain-reps", type=int, help="repetitions of the cold drain (3)")
    p.add_argument(
        "--put-workers",
        type=int,
        default=1,
        help="workers per target during the PUT runs (0: the write path alone)",
    )
    p.add_argument("--drain-workers", type=int, default=2, help="workers of the cold drain")
    p.add_argument("--batch-ops", type=int, default=100, help="puts per POST /v1/batch")
    p.add_argument(
        "--load-connections",
        type=int,
        default=2,
        help="connections of the cold load (2: a Cluster node's client pool refuses more "
        "than REDIS_MAX_CONNECTIONS concurrent commands, see bench/README.md)",
    )
    p.add_argument(
        "--cluster-replicas",
        default="0",
        help="replicas per primary of the 3-primary Cluster; several (0,1): one Cluster "
        "target each",
    )
    p.add_argument(
        "--cluster-shards",
        type=int,
        help="REDIS_SHARDS of the Cluster targets only (default: the service's, 16)",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every wbcache process of every target (e.g. REDIS_SHARDS=3)",
    )
    p.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL.replace("wbcache_bench_suite", "wbcache_bench_cluster"),
        help="dedicated database, created/migrated, TRUNCATED (its name must contain 'bench')",
    )
    a = p.parse_args(argv)
    full = {"duration": 8.0, "warmup": 2.0, "reps": 3, "keys": 10_000}
    full |= {"drain_keys": 50_000, "drain_reps": 3}
    quick = {"duration": 3.0, "warmup": 1.0, "reps": 1, "keys": 2_000}
    quick |= {"drain_keys": 5_000, "drain_reps": 1}
    for name, value in (quick if a.quick else full).items():
        if getattr(a, name) is None:
            setattr(a, name, value)
    a.phases = [v.strip() for v in a.phases.split(",") if v.strip()]
    if not a.phases or set(a.phases) - {"put", "drain"}:
        p.error("--phases takes put, drain or put,drain")
    a.connections = [int(v) for v in a.connections.split(",") if v.strip()]
    a.cluster_replicas = [int(v) for v in a.cluster_replicas.split(",") if v.strip()]
    env: dict[str, str] = {}
    for item in a.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--service-env wants NAME=VALUE, got {item!r}")
        env[name.upper()] = value
    a.service_env = env
    a.write_delay_ms = int(
        env.get("WRITE_DELAY_MS", Settings.model_fields["write_delay_ms"].default)
    )
    if "bench" not in a.database_url.rsplit("/", 1)[-1]:
        p.error("use a dedicated database whose name contains 'bench'")

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir = RESULTS_DIR / f"cluster-{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        with tempfile.TemporaryDirectory(prefix="wbcache-bench-cluster-") as tmp:
            measured = asyncio.run(_main_task(a, Path(tmp), log_dir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every server and process it started is stopped", file=sys.stderr)
        return 130
    results: dict[str, Any] = {
        "started_at": started_at,
        "git": core.git_revision(),
        "cpus": os.cpu_count(),
        "config": {
            k: getattr(a, k)
            for k in ("connections", "duration", "warmup", "reps", "keys", "drain_keys")
        }
        | {
            "phases": a.phases,
            "drain_reps": a.drain_reps,
            "put_workers": a.put_workers,
            "drain_workers": a.drain_workers,
            "write_delay_ms": a.write_delay_ms,
            "batch_ops": a.batch_ops,
            "load_connections": a.load_connections,
            "cluster_replicas": a.cluster_replicas,
            "cluster_shards": a.cluster_shards,
            "service_env": a.service_env,
            "quick": a.quick,
        },
        **measured,
        "logs": str(log_dir),
    }
    results["summary"] = summarize(results)
    out = RESULTS_DIR / f"cluster-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\nbench.cluster {started_at}  git {results['git']}  {results['cpus']} CPUs  "
        f"(machine {results['background_cpu_busy']:.0%} busy before start; load average "
        f"{results['load_average_before'][0]:.2f} before, "
        f"{results['load_average_after'][0]:.2f} after)\n"
    )
    print(markdown(results))
    print(f"\nresults: {out}\nlogs:    {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
