"""The edge benchmark: ``python -m bench.edge`` (docs/edge.md has the numbers).

Real ``wbcache serve`` and ``wbcache worker`` processes, a collection made public
(COLLECTION_CACHE: s-maxage 300) with 10,000 keys written beforehand, and a throwaway
Varnish running deploy/varnish/default.vcl whose purges the worker sends
(EDGE_PURGE_URLS). The same wrk load (bench/apps/wrk/edge.lua: 95 % GET, 5 % PUT, keys
uniform) is pointed first straight at the API, then at the edge:

* req/s and latency percentiles of the mix (GETs are 95 % of it);
* the edge's hit ratio over the run (varnishstat: cache_hit / (cache_hit + cache_miss));
* write-to-visible-at-edge delay, under that load: a probe PUTs a random key of the
  collection to the API every 100 ms and reads it through the edge every 2 ms until the
  edge answers the acknowledged version; p50/p95/p99/max of those delays.

Postgres and Redis: ``--redis-url`` / ``--database-url`` (defaults below); keys under the
prefix ``wbedge:`` are deleted first, ``records`` of the bench database truncated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import redis

from bench.env import REPO_ROOT, ServiceProcess, service_env, start_servers
from service.adapters.migrate import migrate
from service.dev.varnish import Varnish, edge_for_api

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/wbcache_bench_edge"
PREFIX = "wbedge:"
COLLECTION = "shared"
WRK_SCRIPT = REPO_ROOT / "bench" / "apps" / "wrk" / "edge.lua"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    p.add_argument("--keys", type=int, default=10_000)
    p.add_argument("--write-percent", type=float, default=5.0)
    p.add_argument("--duration", type=int, default=15, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args()


async def probe_delays(api_url: str, edge_url: str, keys: int, stop: asyncio.Event) -> list[float]:
    """PUT a random key to the API, then read it through the edge until it shows the
    acknowledged version; the seconds in between, one sample per write."""
    rng = random.Random(7)
    delays: list[float] = []
    async with (
        httpx.AsyncClient(base_url=api_url, timeout=10) as api,
        httpx.AsyncClient(base_url=edge_url, timeout=10) as edge,
    ):
        seq = 0
        while not stop.is_set():
            path = f"/v1/{COLLECTION}/k{rng.randrange(keys):05d}"
            # Fill the edge with the old version first, so the write has something to purge.
            await edge.get(path)
            seq += 1
            put = await api.put(path, json={"probe": seq})
            acked = time.monotonic()
            assert put.status_code in (200, 201), put.text
            while True:
                seen = await edge.get(path)
                if seen.status_code == 200 and seen.headers.get("etag") == put.headers["etag"]:
                    delays.append(time.monotonic() - acked)
                    break
                if time.monotonic() - acked > 10:
                    raise AssertionError(f"{path}: {put.headers['etag']} not at the edge in 10 s")
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.1)
    return delays


def run_wrk(url: str, a: argparse.Namespace, seed: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            "wrk",
            f"-t{a.threads}",
            f"-c{a.connections}",
            f"-d{a.duration}s",
            "--latency",
            "-s",
            str(WRK_SCRIPT),
            url,
            "--",
            COLLECTION,
            str(a.keys),
            str(a.write_percent),
            str(seed),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
    result["req_per_s"] = round(result["requests"] / (result["duration_us"] / 1e6))
    return result


async def _measure(url: str, api_url: str, edge_url: str | None, a: argparse.Namespace) -> Any:
    stop = asyncio.Event()
    probe = asyncio.create_task(probe_delays(api_url, edge_url, a.keys, stop)) if edge_url else None
    result = await asyncio.to_thread(run_wrk, url, a, 1)
    stop.set()
    delays = await probe if probe is not None else []
    return result, delays


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]


async def prefill(api_url: str, keys: int) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as api:
        for start in range(0, keys, 500):
            ops = [
                {"op": "put", "collection": COLLECTION, "key": f"k{i:05d}", "document": {"i": i}}
                for i in range(start, min(keys, start + 500))
            ]
            r = await api.post("/v1/batch", json={"operations": ops})
            assert r.status_code == 200, r.text[:300]


def main() -> None:
    a = _args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    servers = start_servers(a.redis_url, a.database_url)
    tmp = Path(tempfile.mkdtemp(prefix="wbcache-bench-edge-"))
    procs: list[ServiceProcess] = []
    varnish: Varnish | None = None
    try:
        migrate(servers.database_url)
        r = redis.Redis.from_url(servers.redis_url)
        for k in r.scan_iter(match=f"{PREFIX}*", count=1000):
            r.delete(k)

        async def truncate() -> None:
            conn = await asyncpg.connect(servers.database_url)
            await conn.execute("TRUNCATE records, tombstones")
            await conn.close()

        asyncio.run(truncate())
        api_port, varnish = edge_for_api(tmp / "varnish")
        env = service_env(
            servers.redis_url,
            servers.database_url,
            PREFIX,
            {
                "COLLECTION_CACHE": orjson.dumps(
                    {COLLECTION: {"public": True, "max_age": 0, "s_maxage": 300}}
                ).decode(),
                "EDGE_PURGE_URLS": varnish.url,
            },
        )
        api = ServiceProcess("api", ["serve", "--port", str(api_port)], env, tmp / "api.log")
        worker = ServiceProcess("worker", ["worker"], env, tmp / "worker.log")
        procs += [api, worker]
        api.start()
        worker.start()
        api_url = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                asyncio.run(prefill(api_url, a.keys))
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results: dict[str, Any] = {"settings": vars(a)}
        direct, _ = asyncio.run(_measure(api_url, api_url, None, a))
        results["direct"] = direct
        before = varnish.counters()
        through, delays = asyncio.run(_measure(varnish.url, api_url, varnish.url, a))
        after = varnish.counters()
        hits = after["MAIN.cache_hit"] - before["MAIN.cache_hit"]
        misses = after["MAIN.cache_miss"] - before["MAIN.cache_miss"]
        through["hit_ratio"] = round(hits / (hits + misses), 4) if hits + misses else None
        results["edge"] = through
        results["visible_delay_s"] = {
            "samples": len(delays),
            "p50": round(statistics.median(delays), 4),
            "p95": round(_percentile(delays, 95), 4),
            "p99": round(_percentile(delays, 99), 4),
            "max": round(max(delays), 4),
        }
        print(json.dumps(results, indent=2))
    finally:
        for p in reversed(procs):
            p.stop()
        if varnish is not None:
            varnish.stop()
        servers.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
