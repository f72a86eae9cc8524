"""PUT latency with ``REDIS_MIN_REPLICAS`` 0 vs 1, side by side in one run:
``python -m bench.replicas``.

A throwaway Redis primary (AOF, ``appendfsync everysec``, as production runs) with one
replica, both on this machine; two ``wbcache serve`` processes on that primary, the same
prefix and keys, one with ``REDIS_MIN_REPLICAS=0`` and one with ``1``
(``REDIS_REPLICA_TIMEOUT_MS`` default); one worker. Both targets run against the same
replicated primary, so the only difference is the WAIT in each write's round trip. Every
key is PUT once first (cached entries: one EVALSHA [+ WAIT] per PUT), then, per connection
count, repetitions of bench/suite.py's wrk PUT run with the order of the two targets
alternated, a warm-up discarded. Reports the medians of req/s, p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, cast

import asyncpg
import redis

from bench.env import ProcessGroup, service_env
from bench.suite import (
    DEFAULT_DATABASE_URL,
    RESULTS_DIR,
    Target,
    parse_args,
    prefill,
    wait_drained,
    wait_http,
    wait_workers,
    wrk,
)
from service.adapters.migrate import migrate
from service.dev.embedded import RedisServer
from service.dev.server import HOST

PREFIX = "wbrep:"


def _online(primary: RedisServer) -> bool:
    client = redis.Redis(host=HOST, port=primary.port, socket_timeout=2)
    try:
        info = cast(dict[str, Any], client.info("replication"))
        slave = info.get("slave0")
        return isinstance(slave, dict) and slave.get("state") == "online"
    finally:
        client.close()


async def _target(group: ProcessGroup, name: str, replicas: int, workers: int) -> Target:
    group.env = {**group.env, "REDIS_MIN_REPLICAS": str(replicas)}
    proc, port = group.api()
    target = Target(name, port, "bench", [proc], wbcache=True, prefix=PREFIX)
    for _ in range(workers):
        target.workers.append(group.worker())
    await wait_http(proc, port, "/readyz")
    await wait_workers(target)
    return target


async def run(a: argparse.Namespace, base: Path) -> dict[str, Any]:
    primary = RedisServer(
        base / "primary", appendonly=True, extra_args=["--repl-diskless-sync-delay", "0"]
    )
    await asyncio.to_thread(primary.start)
    replica = RedisServer(
        base / "replica", appendonly=True, extra_args=["--replicaof", HOST, str(primary.port)]
    )
    group: ProcessGroup | None = None
    try:
        await asyncio.to_thread(replica.start)
        for _ in range(300):  # bounded: 30 s
            if _online(primary):
                break
            await asyncio.sleep(0.1)
        else:
            raise TimeoutError("the replica did not come online within 30 s")
        await asyncio.to_thread(migrate, a.database_url)
        pg = await asyncpg.connect(a.database_url)
        await pg.execute("TRUNCATE records, tombstones")
        await pg.close()
        # bench.suite's wrk() takes its keyspace and document size from suite Options.
        opts = parse_args(
            ["--sections", "drain", "--keys", str(a.keys), "--database-url", a.database_url]
        )
        env = service_env(primary.url, a.database_url, PREFIX, {})
        group = ProcessGroup(base / "logs", env)
        zero = await _target(group, "min_replicas=0", 0, workers=1)
        one = await _target(group, "min_replicas=1", 1, workers=0)
        print(f"prefill: PUT {a.keys:,} keys once ...")
        await prefill(zero, a.keys, opts.doc_bytes)
        await wait_drained(zero)
        runs: list[dict[str, Any]] = []
        for c in a.connections:
            for t in (zero, one):  # warm-up, discarded
                await wrk(t.port, "put", c, a.warmup, t.collection, opts, base / "wrk.log")
            for rep in range(a.reps):
                order = (zero, one) if rep % 2 == 0 else (one, zero)
                for t in order:
                    r = await wrk(
                        t.port, "put", c, a.duration, t.collection, opts, base / "wrk.log"
                    )
                    r.update(target=t.name, connections=c, rep=rep)
                    runs.append(r)
                    print(
                        f"  c{c} rep {rep} {t.name}: {r['rps']:.0f} req/s, "
                        f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, non-2xx {r['non_2xx_3xx']}"
                    )
        await wait_drained(zero)
        table = {}
        for c in a.connections:
            for t in (zero, one):
                rs = [r for r in runs if r["target"] == t.name and r["connections"] == c]
                table[f"PUT c{c} {t.name}"] = {
                    k: round(statistics.median(r[k] for r in rs), 2)
                    for k in ("rps", "p50_ms", "p99_ms")
                } | {"non_2xx_3xx": sum(r["non_2xx_3xx"] for r in rs)}
        return {"runs": runs, "table": table, "load_average_after": os.getloadavg()}
    finally:
        if group is not None:
            group.stop_all()
        replica.stop()
        primary.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    p.add_argument("--connections", default="1,32", help="wrk connection counts (1,32)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded warm-up")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL.replace("wbcache_bench_suite", "wbcache_bench_replicas"),
        help="dedicated database, created/migrated, TRUNCATED (its name must contain 'bench')",
    )
    a = p.parse_args(argv)
    a.connections = [int(v) for v in a.connections.split(",") if v.strip()]
    if "bench" not in a.database_url.rsplit("/", 1)[-1]:
        p.error("use a dedicated database whose name contains 'bench'")
    with tempfile.TemporaryDirectory(prefix="wbcache-bench-replicas-") as tmp:
        results = asyncio.run(run(a, Path(tmp)))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / "replicas.json"
    out.write_text(json.dumps(results, indent=2))
    print("\n| run | req/s | p50 ms | p99 ms | non-2xx |\n| --- | ---: | ---: | ---: | ---: |")
    for name, row in results["table"].items():
        print(
            f"| {name} | {row['rps']:.0f} | {row['p50_ms']} | {row['p99_ms']} "
            f"| {row['non_2xx_3xx']} |"
        )
    load = ", ".join(f"{v:.2f}" for v in results["load_average_after"])
    print(f"\nload average after: {load}\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
