"""CPU per Redis command of the API's client: stock redis-py, service/adapters/redis.py's
pool, and service/adapters/redis_mux.py's shared auto-pipelined connection:
``python -m bench.redis_client [REDIS_URL]`` (default ``redis://127.0.0.1:6379/12``; it
writes keys under ``wbmicro:`` and deletes them at the end).

C concurrent tasks (as concurrent requests in one API process) call a script shaped like
the service's write script (5 keys, 13 arguments, a ~200-byte document) by EVALSHA, and
HMGET as a cache hit does. Reported: this process' CPU time per command (getrusage) and
commands/s, medians of interleaved rounds, for each pool.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from redis.asyncio import ConnectionPool, Redis

from service.adapters.redis import LeanConnectionPool
from service.adapters.redis_mux import RedisMux

DOC = orjson.dumps({"id": 1, "name": "user-000001", "notes": "x" * 150})
SCRIPT = "redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2]) return {'OK', ARGV[1], '0'}"
OPTIONS: dict[str, Any] = {
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 15,
    "max_connections": 64,
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _round(client: Redis, op: str, tasks: int, calls: int) -> tuple[float, float]:
    script = client.register_script(SCRIPT)

    async def one(i: int) -> None:
        for j in range(calls):
            entry = f"wbmicro:e:{i}:{j % 10}"
            if op == "evalsha":
                keys = [entry, "wbmicro:d", "wbmicro:i", "wbmicro:w", "wbmicro:x"]
                args: list[Any] = [str(j), DOC, "put", "m", "0", "", "0", "", "", "0", "0"]
                await script(keys=keys, args=[*args, "0", 6000])
            else:
                await client.hmget(entry, ["v", "d", "t", "x"])  # type: ignore[misc]

    await asyncio.gather(*(one(i) for i in range(tasks)))  # warm-up: connections, script
    c0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(tasks)))
    c1, t1 = _cpu(), time.perf_counter()
    n = tasks * calls
    return (c1 - c0) / n * 1e6, n / (t1 - t0)


async def _round_mux(url: str, op: str, tasks: int, calls: int) -> tuple[float, float]:
    """``_round`` through service/adapters/redis_mux.py's shared connection."""
    pool = LeanConnectionPool.from_url(url, **OPTIONS)
    mux = RedisMux(pool)
    sha = await mux.execute("SCRIPT", "LOAD", SCRIPT)

    async def one(i: int) -> None:
        for j in range(calls):
            entry = f"wbmicro:e:{i}:{j % 10}"
            if op == "evalsha":
                keys = [entry, "wbmicro:d", "wbmicro:i", "wbmicro:w", "wbmicro:x"]
                args: list[Any] = [str(j), DOC, "put", "m", "0", "", "0", "", "", "0", "0"]
                await mux.execute("EVALSHA", sha, len(keys), *keys, *args, "0", 6000)
            else:
                await mux.execute("HMGET", entry, "v", "d", "t", "x")

    try:
        await asyncio.gather(*(one(i) for i in range(tasks)))  # warm-up
        c0, t0 = _cpu(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(tasks)))
        c1, t1 = _cpu(), time.perf_counter()
    finally:
        await mux.aclose()
        await pool.aclose()
    n = tasks * calls
    return (c1 - c0) / n * 1e6, n / (t1 - t0)


async def run(url: str, tasks: int, calls: int, rounds: int) -> None:
    pools: dict[str, Callable[[], ConnectionPool]] = {
        "redis-py ConnectionPool": lambda: ConnectionPool.from_url(url, **OPTIONS),
        "service LeanConnectionPool": lambda: LeanConnectionPool.from_url(url, **OPTIONS),
    }
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for op in ("evalsha", "hmget"):
            for name, make in pools.items():
                client = Redis(connection_pool=make())
                results.setdefault((op, name), []).append(await _round(client, op, tasks, calls))
                await client.aclose(close_connection_pool=True)
            mux_round = await _round_mux(url, op, tasks, calls)
            results.setdefault((op, "service RedisMux (shared)"), []).append(mux_round)
    cleanup = Redis.from_url(url)
    async for key in cleanup.scan_iter(match="wbmicro:*", count=1000):
        await cleanup.delete(key)
    await cleanup.aclose()
    print(f"{tasks} concurrent tasks, {calls} calls each, medians of {rounds} rounds")
    for (op, name), rs in results.items():
        cpu = statistics.median(r[0] for r in rs)
        rate = statistics.median(r[1] for r in rs)
        print(f"{op:8} {name:28} {cpu:7.1f} µs CPU/command  {rate:9,.0f} commands/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("url", nargs="?", default="redis://127.0.0.1:6379/12")
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    asyncio.run(run(a.url, a.tasks, a.calls, a.rounds))


if __name__ == "__main__":
    main()
