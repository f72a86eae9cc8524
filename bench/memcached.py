"""The memcached door, side by side in one run (issue 13): memcached-protocol sets/s and
gets/s against wbcache, against a real ``memcached`` on the same machine (the protocol's
ceiling), and wbcache's HTTP PUT/GET of the same documents, with latency percentiles.

    python -m bench.memcached [--ops 30000] [--keys 10000] [--connections 32]

One small asyncio driver speaks both protocols (one request in flight per connection, as
most clients do), so every row pays the same client cost. wbcache runs as real
``wbcache serve --memcached-port`` and ``wbcache worker`` processes (default settings);
each row writes its own collection of never-written keys, then reads them back. Redis is
FLUSHED (``--redis-url``, default db 14) and the records table truncated, as bench.core
does. Results as JSON in bench/results/memcached-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import redis
import redis.asyncio

from bench.core import Api, _new_loop, background_busy, document, git_revision, percentile
from bench.env import ProcessGroup, Servers, redis_cpu_seconds, service_env, start_servers
from bench.http import Connection, encode_request
from service.adapters.migrate import migrate
from service.config import Settings
from service.core.key_filter import KeyFilter
from service.core.shards import Shards
from service.dev.embedded import free_port

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/wbcache_bench_memcached"
RESULTS = Path(__file__).parent / "results"
PREFIX = "wbbench:"
# Issue 13's targets: sets >= 3x the HTTP PUT rate, set p99 under PUT's.
TARGET_SET_OVER_PUT = 3.0


@dataclass
class Phase:
    name: str
    ops: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.latencies]
        return {
            "ops": self.ops,
            "errors": self.errors,
            "ops_per_s": round(self.ops / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(percentile(ms, 0.50), 2),
            "p99_ms": round(percentile(ms, 0.99), 2),
        }


class _Stream:
    """One memcached-protocol connection of the driver."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> _Stream:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def close(self) -> None:
        self.writer.close()


class _Http(Connection):
    """bench.http's keep-alive connection, with the driver's open/close."""

    async def open(self) -> _Http:
        return self


# One batch of operations (their indexes) on a connection: how many succeeded.
Op = Callable[[Any, range], Awaitable[int]]


async def _drive(
    name: str,
    connect: Callable[[], Awaitable[Any]],
    ops: int,
    connections: int,
    op: Op,
    depth: int = 1,
) -> Phase:
    """``ops`` operations over ``connections`` connections, each sending ``depth`` requests
    before it reads their replies (1: one at a time, as most clients do; more: pipelined,
    as memtier's --pipeline does). The latency recorded is each batch's."""
    phase = Phase(name)
    next_op = 0

    async def client() -> None:
        nonlocal next_op
        conn = await connect()
        try:
            while next_op < ops:
                batch = range(next_op, min(next_op + depth, ops))
                next_op = batch.stop
                started = time.perf_counter()
                ok = await op(conn, batch)
                phase.latencies.append(time.perf_counter() - started)
                phase.ops += ok
                phase.errors += len(batch) - ok
        finally:
            await conn.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    phase.seconds = time.monotonic() - started
    return phase


@dataclass(frozen=True)
class _Protocol:
    """One memcached command kind: the request of operation ``i`` and how to read a reply."""

    request: Callable[[int], bytes]
    reply: Callable[[_Stream], Awaitable[bool]]

    async def __call__(self, conn: _Stream, batch: range) -> int:
        conn.writer.write(b"".join(self.request(i) for i in batch))
        return sum([await self.reply(conn) for _ in batch])


def _memcached_ops(collection: str, keys: int, docs: list[bytes]) -> tuple[_Protocol, _Protocol]:
    names = [f"{collection}:k{i:07d}".encode() for i in range(keys)]

    def set_request(i: int) -> bytes:
        k = i % keys
        return b"set %s 0 0 %d\r\n%s\r\n" % (names[k], len(docs[k]), docs[k])

    async def stored(conn: _Stream) -> bool:
        return await conn.reader.readline() == b"STORED\r\n"

    async def value(conn: _Stream) -> bool:
        head = await conn.reader.readline()
        if head == b"END\r\n":
            return False
        await conn.reader.readexactly(int(head.rsplit(b" ", 1)[1]) + 2)
        return await conn.reader.readline() == b"END\r\n"

    def get_request(i: int) -> bytes:
        return b"get %s\r\n" % names[i % keys]

    return _Protocol(set_request, stored), _Protocol(get_request, value)


def _http_ops(collection: str, keys: int, docs: list[bytes], hostport: str) -> tuple[Op, Op]:
    json_type = (("Content-Type", "application/json"),)
    puts = [
        encode_request("PUT", f"/v1/{collection}/k{i:07d}", hostport, docs[i], json_type)
        for i in range(keys)
    ]
    gets = [encode_request("GET", f"/v1/{collection}/k{i:07d}", hostport) for i in range(keys)]

    async def put(conn: _Http, batch: range) -> int:
        status, _ = await conn.send(puts[batch.start % keys])
        return status in (200, 201)

    async def get(conn: _Http, batch: range) -> int:
        status, _ = await conn.send(gets[batch.start % keys])
        return status == 200

    return put, get


class RealMemcached:
    """memcached itself (Debian's package), two threads, on a free port."""

    def __init__(self) -> None:
        self.port = free_port()
        binary = shutil.which("memcached")
        if binary is None:
            raise SystemExit("memcached is missing: bash scripts/ensure-test-packages.sh")
        argv = [binary, "-l", "127.0.0.1", "-p", str(self.port), "-t", "2", "-m", "512"]
        if os.geteuid() == 0:  # memcached refuses root without a user to run as
            argv += ["-u", "root"]
        self.popen = subprocess.Popen(
            [*argv, "-U", "0"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def ready(self) -> None:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("memcached did not start")

    def stop(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)


# CPU clocks by name (seconds used so far): the server process, and for wbcache also the
# worker and Redis, which both of its doors share.
Clocks = dict[str, Callable[[], float]]


def _cpu(pid: int) -> Callable[[], float]:
    process = psutil.Process(pid)

    def used() -> float:
        times = process.cpu_times()
        return times.user + times.system

    return used


async def _measured(clocks: Clocks, phase: Awaitable[Phase]) -> dict[str, Any]:
    """The phase's summary, with each clock's CPU per operation: on a busy machine the
    rates move with the neighbours' load, CPU per operation much less."""
    before = {name: clock() for name, clock in clocks.items()}
    done = await phase
    summary = done.summary()
    for name, clock in clocks.items():
        used = clock() - before[name]
        summary[f"{name}_cpu_us_per_op"] = round(used / max(done.ops, 1) * 1e6, 1)
    return summary


async def _pair(
    label: str,
    clocks: Clocks,
    connect: Callable[[], Awaitable[Any]],
    ops: tuple[Op, Op],
    n: int,
    c: int,
    depth: int = 1,
) -> dict[str, Any]:
    set_op, get_op = ops
    await _drive("warm-up", connect, min(n // 10, 2000), c, get_op, depth)
    sets = await _measured(clocks, _drive(f"{label} set", connect, n, c, set_op, depth))
    gets = await _measured(clocks, _drive(f"{label} get", connect, n, c, get_op, depth))
    print(f"  {label:28} set {sets}\n  {'':28} get {gets}", flush=True)
    return {"set": sets, "get": gets}


async def run(opts: argparse.Namespace, servers: Servers, log_dir: Path) -> dict[str, Any]:
    docs = [document(i, opts.value_bytes) for i in range(opts.keys)]
    mc_port = free_port()
    env = service_env(
        servers.redis_url, servers.database_url, PREFIX, {"MEMCACHED_PORT": str(mc_port)}
    )
    group = ProcessGroup(log_dir, env)
    real = RealMemcached()
    redis_client = redis.Redis.from_url(servers.redis_url)
    api: Api | None = None
    try:
        results: dict[str, Any] = {"background_cpu_busy": await background_busy()}
        proc, port = group.api()
        api = Api(proc, port)
        await api.wait_ready()
        worker = group.worker()
        await real.ready()
        await _key_filter_ready(servers.redis_url)
        n, c = opts.ops, opts.connections
        print(f"{n:,} sets then {n:,} gets over {opts.keys:,} keys, {c} connections:")
        real_clocks: Clocks = {"server": _cpu(real.popen.pid)}
        wb_clocks: Clocks = {
            "server": _cpu(proc.pid),
            "worker": _cpu(worker.pid),
            "redis": lambda: redis_cpu_seconds(redis_client),
        }
        results["memcached_real"] = await _pair(
            "memcached (ceiling)",
            real_clocks,
            lambda: _Stream(real.port).open(),
            _memcached_ops("real", opts.keys, docs),
            n,
            c,
        )
        results["wbcache_memcached"] = await _pair(
            "wbcache, memcached protocol",
            wb_clocks,
            lambda: _Stream(mc_port).open(),
            _memcached_ops("mcb", opts.keys, docs),
            n,
            c,
        )
        results["wbcache_http"] = await _pair(
            "wbcache, HTTP PUT/GET",
            wb_clocks,
            lambda: _Http("127.0.0.1", port).open(),
            _http_ops("httpb", opts.keys, docs, api.hostport),
            n,
            c,
        )
        d, pc = opts.pipeline, max(1, c // 8)
        print(f"pipelined: {pc} connections, {d} requests in flight each:")
        for label, name, clocks, p in (
            ("memcached", "real", real_clocks, real.port),
            ("wbcache", "mcb", wb_clocks, mc_port),
        ):

            def connect(port: int = p) -> Awaitable[_Stream]:
                return _Stream(port).open()

            results[f"pipelined_{name}"] = await _pair(
                label, clocks, connect, _memcached_ops(f"{name}p", opts.keys, docs), n, pc, d
            )
        mc, http = results["wbcache_memcached"], results["wbcache_http"]
        results["ratios"] = {
            "set_over_put": round(mc["set"]["ops_per_s"] / http["set"]["ops_per_s"], 2),
            "get_over_http_get": round(mc["get"]["ops_per_s"] / http["get"]["ops_per_s"], 2),
            "set_p99_over_put_p99": round(mc["set"]["p99_ms"] / http["set"]["p99_ms"], 2),
            "put_cpu_over_set_cpu": round(
                http["set"]["server_cpu_us_per_op"] / mc["set"]["server_cpu_us_per_op"], 2
            ),
            "http_get_cpu_over_get_cpu": round(
                http["get"]["server_cpu_us_per_op"] / mc["get"]["server_cpu_us_per_op"], 2
            ),
            "set_over_real_memcached": round(
                mc["set"]["ops_per_s"] / results["memcached_real"]["set"]["ops_per_s"], 3
            ),
        }
        results["targets"] = {
            "set_3x_put": results["ratios"]["set_over_put"] >= TARGET_SET_OVER_PUT,
            "set_p99_under_put_p99": mc["set"]["p99_ms"] < http["set"]["p99_ms"],
        }
        return results
    finally:
        if api is not None:
            await api.close()
        group.stop_all()
        real.stop()
        redis_client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memcached", description=__doc__)
    p.add_argument("--ops", type=int, default=30000, help="sets, then gets, per row")
    p.add_argument("--keys", type=int, default=10000, help="distinct keys per row")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--value-bytes", type=int, default=200)
    p.add_argument("--pipeline", type=int, default=32, help="requests in flight, pipelined rows")
    p.add_argument(
        "--redis-url", default=os.environ.get("WBCACHE_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("WBCACHE_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL),
    )
    opts = p.parse_args(argv)
    if "bench" not in opts.database_url.rsplit("/", 1)[-1]:
        raise SystemExit("--database-url: the database's name must contain 'bench'")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = RESULTS / f"memcached-{stamp}-logs"
    random.seed(1)
    servers = start_servers(opts.redis_url, opts.database_url)
    try:
        for note in servers.notes:
            print(note)
        client = redis.Redis.from_url(servers.redis_url)
        client.flushdb()
        client.close()
        migrate(servers.database_url)
        asyncio.run(_truncate(servers.database_url))
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            results = runner.run(run(opts, servers, log_dir))
    finally:
        servers.close()
    results = {
        "started_at": stamp,
        "git": git_revision(),
        "cpus": os.cpu_count(),
        "config": vars(opts),
        **results,
    }
    out = RESULTS / f"memcached-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"ratios": results["ratios"], "targets": results["targets"]}, indent=2))
    print(f"results: {out}")
    return 0


async def _key_filter_ready(redis_url: str, timeout: float = 60) -> None:
    """Until the worker completed the key filter: before that, a write to a key never
    written reads Postgres first, and the row that ran first would pay for it alone."""
    settings = Settings(redis_url=redis_url, redis_prefix=PREFIX)
    origin = KeyFilter.from_settings(settings).origin(Shards.from_settings(settings).any)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while not await client.exists(origin):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not complete the key filter")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def _truncate(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("TRUNCATE records, tombstones")
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
