"""The side-by-side suite: ``make bench-suite`` (``python -m bench.suite``).

In one run, on one machine, each served the same way (uvicorn, uvloop, httptools, one
process, access log off) and driven by the same ``wrk`` script:

* ``ceiling``: bench/apps/ceiling.py, no storage at all (read the body, orjson, ETag);
* ``write-through``: bench/apps/write_through.py, Postgres upsert then Redis SET per PUT;
* ``wbcache``: ``python -m service.cli serve`` + ``python -m service.cli worker``, default
  settings, on the suite's own Redis db / prefix and database;

PUT and GET (keys written beforehand, so cached), PUT-random (1,000,000 keys, mostly
never written) and PUT-insert (keys never written) at each connection count, a warm-up
discarded, several repetitions with the order of the apps rotated: req/s, p50, p99 and
the ratio of each to the ceiling's (req/s also to write-through's) same operation. Then,
on wbcache alone: ``POST /v1/batch`` (100 puts per request) next to ``redis-benchmark -t
set`` on the same Redis; py-spy profiles of the API under PUT and GET load; 2 API
processes + 2 workers against 1 + 1; the cold drain next to the raw batched upsert and
the hot burst of bench/core.py (Postgres row writes per accepted write); peak RSS
(VmHWM) of every process. ``--sections sweep`` runs the cold drain per BATCH_SIZE and
the hot burst per WRITE_DELAY_MS.

See bench/README.md for how to read the numbers, docs/performance.md for results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import asyncpg
import orjson
import redis

from bench import core, cost
from bench.env import (
    REPO_ROOT,
    ProcessGroup,
    Servers,
    ServiceProcess,
    cpu_breakdown,
    database_name,
    redis_cpu_seconds,
    service_env,
    start_servers,
    system_cpu_seconds,
)
from bench.http import Connection, HttpError, encode_request
from service.adapters.migrate import migrate
from service.dev import processes
from service.dev.embedded import free_port

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/wbcache_bench_suite"
PREFIX = "wbsuite:"
PREFIX2 = "wbsuite2:"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
WRK_SCRIPT = REPO_ROOT / "bench" / "apps" / "wrk" / "load.lua"

# The service's Lua scripts by SHA1, to name them in Redis' SLOWLOG.
SCRIPT_NAMES = {
    hashlib.sha1(path.read_bytes()).hexdigest(): path.stem
    for path in sorted((REPO_ROOT / "service" / "core" / "lua").glob("*.lua"))
}

SECTIONS = ("main", "batch", "profile", "scaling", "drain", "sweep", "cost")
DEFAULT_SECTIONS = ("main", "batch", "profile", "scaling", "drain")

# The side-by-side operations (wrk modes of load.lua): PUT and GET on the prefilled
# keyspace; PUT-random over a keyspace mostly never written (--random-keys); PUT-insert of
# keys never written before (a tag of its own per run). The PUTs wait for wbcache's drain.
OPS = ("put", "get", "put-random", "put-insert")
PUT_OPS = ("put", "put-random", "put-insert")

CEILING = "ceiling"
WRITE_THROUGH = "write-through"
WBCACHE = "wbcache"
WBCACHE_2X2 = "wbcache 2+2"

# Targets: ratios measured in the same run.
# Issue 11's targets ("Performance, round 2").
T_PUT_VS_CEILING = 0.8
T_UNCACHED_PUT_VS_CEILING = 0.7  # PUT-random and PUT-insert: writes to keys not cached
T_PUT_VS_WRITE_THROUGH = 2.0
T_GET_VS_CEILING = 1.0
T_PUT_P99_VS_CEILING = 1.5
T_DRAIN_VS_RAW = 0.6
T_BATCH_WRITES_PER_S = 25_000.0  # at 16 connections, 100 operations per request
T_BATCH_CONNECTIONS = 16
T_RSS_MB = 100.0


# --------------------------------------------------------------------------- options


@dataclass
class Options:
    sections: list[str]
    duration: float
    warmup: float
    reps: int
    connections: list[int]
    keys: int
    ops: list[str]
    random_keys: int
    doc_bytes: int
    drain_keys: int
    hot_writes: int
    hot_keys: int
    batch_ops: int
    batch_connections: list[int]
    scaling_reps: int
    profile_seconds: float
    batch_sizes: list[int]
    write_delays: list[int]
    cost_points: list[int]
    redis_url: str
    database_url: str
    service_env: dict[str, str]
    results_dir: Path
    seed: int
    check: bool
    quick: bool


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description="wbcache side by side with a no-storage ceiling and a synchronous "
        "write-through app, plus batch, scaling, drain and memory measurements.",
    )
    p.add_argument("--quick", action="store_true", help="short runs, one repetition: a smoke run")
    p.add_argument(
        "--sections",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all but sweep)",
    )
    p.add_argument("--duration", type=float, help="seconds per measured wrk run (10)")
    p.add_argument("--warmup", type=float, help="seconds of discarded warm-up per app (3)")
    p.add_argument("--reps", type=int, help="repetitions of the side-by-side runs (3)")
    p.add_argument("--connections", default="32,128", help="wrk connection counts (32,128)")
    p.add_argument("--keys", type=int, default=10_000, help="keyspace of the wrk runs")
    p.add_argument(
        "--ops", default=",".join(OPS), help=f"side-by-side operations ({','.join(OPS)})"
    )
    p.add_argument(
        "--random-keys", type=int, default=1_000_000, help="keyspace of PUT-random (not prefilled)"
    )
    p.add_argument("--doc-bytes", type=int, default=200, help="approximate document size")
    p.add_argument("--drain-keys", type=int, help="keys of the cold drain (50000)")
    p.add_argument("--hot-writes", type=int, help="PUTs of the hot burst (20000)")
    p.add_argument("--hot-keys", type=int, help="keys of the hot burst (2000)")
    p.add_argument("--batch-ops", type=int, default=100, help="puts per POST /v1/batch")
    p.add_argument(
        "--batch-connections", default="1,16", help="wrk connection counts, POST /v1/batch"
    )
    p.add_argument("--scaling-reps", type=int, help="repetitions of 1+1 vs 2+2 (2)")
    p.add_argument("--profile-seconds", type=float, default=15, help="py-spy run length")
    p.add_argument("--batch-sizes", default="250,500,1000,2000", help="sweep: BATCH_SIZE values")
    p.add_argument("--write-delays", default="250,500,1000", help="sweep: WRITE_DELAY_MS values")
    p.add_argument("--cost-points", default="", help="cost: keys per point (bench/cost.py's)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--redis-url",
        default=os.environ.get("WBCACHE_SUITE_REDIS_URL", DEFAULT_REDIS_URL),
        help="dedicated Redis db, FLUSHED at start (env WBCACHE_SUITE_REDIS_URL)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("WBCACHE_SUITE_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="dedicated database, created/migrated, TRUNCATED (env WBCACHE_SUITE_DATABASE_URL; "
        "its name must contain 'bench')",
    )
    p.add_argument(
        "--service-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every wbcache process (default: none, i.e. default settings)",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    p.add_argument(
        "--report",
        type=Path,
        nargs="+",
        metavar="JSON",
        help="print the tables of finished runs (several: medians over all their "
        "repetitions), run nothing",
    )
    p.add_argument("--markdown", action="store_true", help="with --report: also as Markdown")
    a = p.parse_args(argv)

    def pick(value: Any, full: Any, quick: Any) -> Any:
        if value is not None:
            return value
        return quick if a.quick else full

    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    for s in sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r} (known: {', '.join(SECTIONS)})")
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    if not ops or set(ops) - set(OPS):
        p.error(f"--ops: some of {', '.join(OPS)}, got {a.ops!r}")
    env: dict[str, str] = {}
    for item in a.service_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--service-env wants NAME=VALUE, got {item!r}")
        env[name.upper()] = value
    opts = Options(
        sections=sections,
        duration=pick(a.duration, 10.0, 4.0),
        warmup=pick(a.warmup, 3.0, 2.0),
        reps=pick(a.reps, 3, 1),
        connections=_ints(a.connections),
        keys=a.keys,
        ops=ops,
        random_keys=a.random_keys,
        doc_bytes=a.doc_bytes,
        drain_keys=pick(a.drain_keys, 50_000, 5_000),
        hot_writes=pick(a.hot_writes, 20_000, 4_000),
        hot_keys=pick(a.hot_keys, 2_000, 400),
        batch_ops=a.batch_ops,
        batch_connections=_ints(a.batch_connections),
        scaling_reps=pick(a.scaling_reps, 2, 1),
        profile_seconds=pick(None, a.profile_seconds, min(a.profile_seconds, 6.0)),
        batch_sizes=_ints(a.batch_sizes),
        write_delays=_ints(a.write_delays),
        cost_points=_ints(a.cost_points),
        redis_url=a.redis_url,
        database_url=a.database_url,
        service_env=env,
        results_dir=a.results_dir,
        seed=a.seed,
        check=a.check,
        quick=a.quick,
    )
    if opts.reps < 1 or opts.duration <= 0 or not opts.connections:
        p.error("--reps must be >= 1, --duration > 0, --connections not empty")
    if "bench" not in database_name(opts.database_url):
        p.error(
            f"refusing to truncate database {database_name(opts.database_url)!r}: "
            "use a dedicated database whose name contains 'bench'"
        )
    if shutil.which("wrk") is None and {"main", "batch", "profile", "scaling"} & set(sections):
        p.error("wrk is not installed: apt-get install -y wrk (Debian package 'wrk')")
    return opts


# --------------------------------------------------------------------------- processes


class AppProcess(ServiceProcess):
    """A reference app under uvicorn, served as ``wbcache serve`` serves the service."""

    def __init__(self, name: str, module: str, port: int, env: dict[str, str], log: Path):
        super().__init__(name, [], env, log)
        self.argv = [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "info",
            "--timeout-graceful-shutdown",
            "10",
        ]


@dataclass
class Target:
    """One thing wrk is pointed at, and the processes that serve it."""

    name: str
    port: int
    collection: str
    api: list[ServiceProcess]
    workers: list[ServiceProcess] = field(default_factory=list)
    wbcache: bool = False
    prefix: str = ""

    @property
    def procs(self) -> list[ServiceProcess]:
        return [*self.api, *self.workers]


def peak_rss_mb(pid: int) -> dict[int, float]:
    """VmHWM (peak resident set) of ``pid`` and each live descendant, in MB (MiB)."""
    out: dict[int, float] = {}
    for p in (proc.pid for proc in processes.tree(pid)):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
        if m:
            out[p] = round(int(m.group(1)) / 1024, 1)
    return out


def rss_report(procs: list[ServiceProcess], label: str = "") -> dict[str, Any]:
    """Peak RSS per process: the process itself and, for ``serve --workers N``, each
    uvicorn worker process (whose peak is what one API process costs)."""
    out: dict[str, Any] = {}
    for proc in procs:
        if not proc.running():
            continue
        peaks = peak_rss_mb(proc.pid)
        if not peaks:
            continue
        children = {p: mb for p, mb in peaks.items() if p != proc.pid}
        out[label + proc.name] = {
            "pid": proc.pid,
            "vmhwm_mb": peaks.get(proc.pid),
            "children_vmhwm_mb": sorted(children.values(), reverse=True),
            "max_mb": max(peaks.values()),
        }
    return out


# --------------------------------------------------------------------------- HTTP helpers


def now() -> float:
    return time.monotonic()


async def wait_http(proc: ServiceProcess, port: int, path: str, timeout: float = 60) -> None:
    conn = Connection("127.0.0.1", port)
    req = encode_request("GET", path, f"127.0.0.1:{port}")
    deadline = now() + timeout
    try:
        while True:
            if not proc.running():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                status, _ = await conn.send(req)
                if status == 200:
                    return
            except (OSError, HttpError, asyncio.IncompleteReadError):
                pass
            if now() > deadline:
                raise TimeoutError(f"{proc.name}: {path} not 200 within {timeout:g} s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def wbcache_stats(port: int) -> dict[str, Any]:
    conn = Connection("127.0.0.1", port)
    try:
        status, body = await conn.send(encode_request("GET", "/v1/stats", f"127.0.0.1:{port}"))
    finally:
        await conn.close()
    if status != 200:
        raise RuntimeError(f"/v1/stats answered {status}: {body[:200]!r}")
    result: dict[str, Any] = orjson.loads(body)
    return result


async def wait_drained(target: Target, timeout: float = 180) -> float:
    """Seconds until wbcache has nothing pending (0 for the reference apps)."""
    if not target.wbcache:
        return 0.0
    started = now()
    while True:
        try:
            s = await wbcache_stats(target.port)
        except RuntimeError as exc:
            # A 503 while the API is still busy with what the load left in flight (seen:
            # "Too many connections" from its Redis pool after POST /v1/batch): retry.
            if now() - started > timeout:
                raise
            print(f"  (retrying /v1/stats: {exc})")
            await asyncio.sleep(0.2)
            continue
        if s["pending"] == 0:
            if s["dead_letters"]:
                raise RuntimeError(f"{target.name}: {s['dead_letters']} dead letters")
            return now() - started
        for w in target.workers:
            if not w.running():
                raise RuntimeError(f"{w.name} exited:\n{w.tail()}")
        if now() - started > timeout:
            raise TimeoutError(f"{target.name}: pending {s['pending']} after {timeout:g} s")
        await asyncio.sleep(0.05)


async def wait_workers(target: Target, timeout: float = 60) -> None:
    if not target.workers:
        return
    deadline = now() + timeout
    while (await wbcache_stats(target.port))["workers"] < len(target.workers):
        for w in target.workers:
            if not w.running():
                raise RuntimeError(f"{w.name} exited:\n{w.tail()}")
        if now() > deadline:
            raise TimeoutError(f"{target.name}: workers not alive within {timeout:g} s")
        await asyncio.sleep(0.2)


async def prefill(target: Target, keys: int, doc_bytes: int, connections: int = 32) -> float:
    """PUT every key of the keyspace once (so GETs hit cached entries); writes/s."""
    host = f"127.0.0.1:{target.port}"
    headers = (("Content-Type", "application/json"),)
    todo = iter(range(keys))
    bad: Counter[int] = Counter()

    async def client() -> None:
        conn = Connection("127.0.0.1", target.port)
        try:
            for i in todo:
                path = f"/v1/{target.collection}/{core.key_name(i)}"
                req = encode_request("PUT", path, host, core.document(i, doc_bytes), headers)
                status, _ = await conn.send(req)
                if status not in (200, 201):
                    bad[status] += 1
        finally:
            await conn.close()

    started = now()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = now() - started
    if bad:
        raise RuntimeError(f"{target.name}: prefill answered {dict(bad)}")
    return keys / seconds


# --------------------------------------------------------------------------- wrk


@dataclass
class Run:
    """One wrk run against one target, with the CPU its processes spent."""

    target: str
    op: str
    connections: int
    rep: int
    result: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "op": self.op,
            "connections": self.connections,
            "rep": self.rep,
            **self.result,
        }


async def wrk(
    port: int,
    mode: str,
    connections: int,
    seconds: float,
    collection: str,
    opts: Options,
    log: Path,
    keys: int | None = None,
    seed: int | None = None,
    tag: str = "i",
) -> dict[str, Any]:
    """One ``wrk -t1`` run of bench/apps/wrk/load.lua; its summary line, parsed. ``keys``
    and ``seed`` default to the options'; ``tag`` names put-insert's keys."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        f"http://127.0.0.1:{port}",
        "--",
        mode,
        collection,
        str(opts.keys if keys is None else keys),
        str(opts.doc_bytes),
        str(opts.seed if seed is None else seed),
        str(opts.batch_ops),
        tag,
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = now()
    wrk_cpu: list[float] = []

    async def sample_wrk_cpu() -> None:
        # wrk's own CPU share near the end of the run: ~1.0 means the load generator,
        # not the server, sets the rate.
        await asyncio.sleep(max(0.5, round(seconds) - 0.5))
        wrk_cpu.append(processes.cpu_seconds(proc.pid) / (now() - started))

    sampler = asyncio.create_task(sample_wrk_cpu())
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 60)
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    except BaseException:
        sampler.cancel()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    text = out.decode(errors="replace")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(f"$ {' '.join(argv)}\n{text}\n")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{text[-2000:]}")
    raw: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
    secs = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    errors = raw["errors"]
    return {
        "requests": raw["requests"],
        "seconds": round(secs, 3),
        "rps": round(raw["requests"] / secs, 1) if secs else 0.0,
        "p50_ms": round(lat["p50"] / 1000, 2),
        "p90_ms": round(lat["p90"] / 1000, 2),
        "p99_ms": round(lat["p99"] / 1000, 2),
        "p999_ms": round(lat["p999"] / 1000, 2),
        "max_ms": round(lat["max"] / 1000, 2),
        "non_2xx_3xx": errors["status"],
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "wrk_cpu_share": round(wrk_cpu[0], 3) if wrk_cpu else None,
        "op_errors": raw.get("op_errors", 0),
    }


class Bench:
    """The running suite: servers, Redis client, logs, results."""

    def __init__(self, opts: Options, servers: Servers, log_dir: Path) -> None:
        self.opts = opts
        self.servers = servers
        self.log_dir = log_dir
        self.redis = redis.Redis.from_url(servers.redis_url)
        self.runs: list[Run] = []
        self.tag = secrets.token_hex(3)  # put-insert keys: <tag>r<run>-<thread>-<n>
        self.run_no = 0

    def close(self) -> None:
        self.redis.close()

    def redis_cpu(self) -> float:
        try:
            return redis_cpu_seconds(self.redis)
        except redis.RedisError:
            return 0.0

    async def measure(
        self, target: Target, op: str, connections: int, rep: int, seconds: float | None = None
    ) -> Run:
        """A wrk run against ``target`` with the CPU seconds per request of its API and
        worker processes, of Redis, and the machine's busy share while it ran."""
        seconds = seconds or self.opts.duration
        api0 = sum(processes.cpu_seconds(p.pid) for p in target.api)
        wk0 = sum(processes.cpu_seconds(p.pid) for p in target.workers)
        rd0 = self.redis_cpu()
        busy0, total0 = system_cpu_seconds()
        wall0 = time.time()
        # Each run its own put-random sequence and put-insert keys: no run rewrites (so
        # finds cached) what an earlier repetition or warm-up wrote.
        self.run_no += 1
        result = await wrk(
            target.port,
            op,
            connections,
            seconds,
            target.collection,
            self.opts,
            self.log_dir / "wrk.log",
            keys=self.opts.random_keys if op == "put-random" else None,
            seed=self.opts.seed + 1000 * self.run_no if op == "put-random" else None,
            tag=f"{self.tag}r{self.run_no}",
        )
        if target.wbcache and op in (*PUT_OPS, "batch"):
            # What the worker had not yet persisted when the load stopped: about
            # WRITE_DELAY_MS of writes if it keeps up; near MAX_PENDING, 503s follow.
            with contextlib.suppress(RuntimeError):
                result["pending_at_end"] = (await wbcache_stats(target.port))["pending"]
        # The worker's share includes flushing what the run left pending.
        drain_s = await wait_drained(target) if op in (*PUT_OPS, "batch") else 0.0
        busy1, total1 = system_cpu_seconds()
        api1 = sum(processes.cpu_seconds(p.pid) for p in target.api)
        wk1 = sum(processes.cpu_seconds(p.pid) for p in target.workers)
        rd1 = self.redis_cpu()
        n = max(1, result["requests"])
        result["api_cpu_us_per_req"] = round((api1 - api0) / n * 1e6, 1)
        if target.workers:
            result["worker_cpu_us_per_req"] = round((wk1 - wk0) / n * 1e6, 1)
            result["drain_after_s"] = round(drain_s, 2)
        result["redis_cpu_us_per_req"] = round((rd1 - rd0) / n * 1e6, 1)
        result["machine_busy"] = round((busy1 - busy0) / (total1 - total0), 3) if total1 else None
        if target.prefix:
            result["redis_slow"] = self.slow_commands(target.prefix, wall0)
        run = Run(target.name, op, connections, rep, result)
        self.runs.append(run)
        errs = result["non_2xx_3xx"] + result["socket_errors"]
        print(
            f"  rep {rep} {target.name:<14} {op:<10} c={connections:<4} "
            f"{result['rps']:>9,.0f} req/s  p50 {result['p50_ms']:6.1f} ms  "
            f"p99 {result['p99_ms']:6.1f} ms  api {result['api_cpu_us_per_req']:.0f} µs/req"
            + (
                f"  pending at end {result['pending_at_end']:,}"
                if "pending_at_end" in result
                else ""
            )
            + (f"  ERRORS {errs} ({result['non_2xx_3xx']} >= 400)" if errs else "")
        )
        return run

    def slow_commands(self, prefix: str, since: float) -> dict[str, Any]:
        """The target's commands in Redis' SLOWLOG (>= slowlog-log-slower-than, 10 ms by
        default) since ``since``: while one runs, Redis serves nobody else. The slowlog
        keeps the last 128 entries of the whole server, so this is a lower bound."""
        try:
            entries = cast(list[dict[str, Any]], self.redis.slowlog_get(128))
        except redis.RedisError:
            return {}
        mine = [
            e
            for e in entries
            if e["start_time"] >= int(since) and prefix.encode() in bytes(e["command"])
        ]
        by_kind: Counter[str] = Counter()
        for e in mine:
            parts = bytes(e["command"]).split()
            kind = b" ".join(parts[:2]).decode(errors="replace")[:60]
            if len(parts) > 1 and parts[0].upper() == b"EVALSHA":
                kind = "script " + SCRIPT_NAMES.get(parts[1].decode(errors="replace"), kind)
            by_kind[kind] += 1
        return {
            "count": len(mine),
            "max_ms": round(max((e["duration"] for e in mine), default=0) / 1000, 1),
            "total_ms": round(sum(e["duration"] for e in mine) / 1000, 1),
            "commands": dict(by_kind.most_common(5)),
        }

    async def warm_up(self, target: Target) -> None:
        for op in ("put", "get"):
            await wrk(
                target.port,
                op,
                max(self.opts.connections),
                self.opts.warmup,
                target.collection,
                self.opts,
                self.log_dir / "wrk-warmup.log",
            )
        await wait_drained(target)

    async def rotated(
        self, targets: list[Target], reps: int, label: str, ops: Sequence[str] = ("put", "get")
    ) -> None:
        """Every target, op and connection count per repetition; the targets' order
        rotates between repetitions."""
        for rep in range(reps):
            k = rep % len(targets)
            order = targets[k:] + targets[:k]
            print(f"{label} repetition {rep + 1}/{reps}: {', '.join(t.name for t in order)}")
            for target in order:
                await self.warm_up(target)
                for op in ops:
                    for c in self.opts.connections:
                        await self.measure(target, op, c, rep)


# --------------------------------------------------------------------------- aggregation


def med(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def aggregate(runs: list[Run], names: list[str], connections: list[int]) -> dict[str, Any]:
    """Medians per (target, op, connections) and the ratio to the ceiling's same run."""
    groups: dict[tuple[str, str, int], list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.target, r.op, r.connections)].append(r)
    table: dict[str, Any] = {}
    for op in [op for op in OPS if any(r.op == op for r in runs)]:
        for c in connections:
            base = groups.get((CEILING, op, c), [])
            base_rps = med([r.result["rps"] for r in base])
            base_p99 = med([r.result["p99_ms"] for r in base])
            wt_rps = med([r.result["rps"] for r in groups.get((WRITE_THROUGH, op, c), [])])
            for name in names:
                rs = groups.get((name, op, c), [])
                if not rs:
                    continue
                rps = med([r.result["rps"] for r in rs])
                p99 = med([r.result["p99_ms"] for r in rs])
                entry: dict[str, Any] = {
                    "reps": len(rs),
                    "rps": rps,
                    "rps_each": [r.result["rps"] for r in rs],
                    "p50_ms": med([r.result["p50_ms"] for r in rs]),
                    "p99_ms": p99,
                    "p99_each": [r.result["p99_ms"] for r in rs],
                    "api_cpu_us_per_req": med([r.result["api_cpu_us_per_req"] for r in rs]),
                    "errors": sum(r.result["non_2xx_3xx"] + r.result["socket_errors"] for r in rs),
                    "machine_busy": med([r.result["machine_busy"] or 0.0 for r in rs]),
                    "wrk_cpu_share": med(
                        [
                            r.result["wrk_cpu_share"] or 0.0
                            for r in rs
                            if "wrk_cpu_share" in r.result
                        ]
                    ),
                }
                slow = [r.result["redis_slow"] for r in rs if r.result.get("redis_slow")]
                if slow:
                    entry["redis_slow_count"] = sum(x["count"] for x in slow)
                    entry["redis_slow_max_ms"] = max(x["max_ms"] for x in slow)
                wk = [
                    r.result["worker_cpu_us_per_req"]
                    for r in rs
                    if "worker_cpu_us_per_req" in r.result
                ]
                if wk:
                    entry["worker_cpu_us_per_req"] = med(wk)
                if base_rps and rps is not None:
                    entry["x_ceiling"] = round(rps / base_rps, 3)
                if wt_rps and rps is not None:
                    entry["x_write_through"] = round(rps / wt_rps, 3)
                pending = [r.result["pending_at_end"] for r in rs if "pending_at_end" in r.result]
                if pending:
                    entry["pending_at_end"] = med(pending)
                if base_p99 and p99 is not None:
                    entry["p99_x_ceiling"] = round(p99 / base_p99, 3)
                table[f"{op} c{c} {name}"] = entry
    return table


# --------------------------------------------------------------------------- sections


async def start_target(
    group: ProcessGroup,
    name: str,
    collection: str,
    api_workers: int = 1,
    workers: int = 1,
    prefix: str = PREFIX,
) -> Target:
    proc, port = group.api(workers=api_workers)
    target = Target(name, port, collection, [proc], wbcache=True, prefix=prefix)
    for _ in range(workers):
        target.workers.append(group.worker())
    await wait_http(proc, port, "/readyz")
    await wait_workers(target)
    return target


def start_app(group: ProcessGroup, name: str, module: str, env: dict[str, str]) -> Target:
    port = free_port()
    proc = AppProcess(name, module, port, env, group.log_dir / f"{name}.log")
    group.procs.append(proc)
    proc.start()
    return Target(name, port, "bench", [proc])


async def start_apps(b: Bench, group: ProcessGroup) -> list[Target]:
    """The ceiling, the write-through app and wbcache (1 API + 1 worker), each with every
    key of the keyspace written once (so GETs hit cached entries)."""
    opts = b.opts
    app_env = {
        **os.environ,
        "WT_DATABASE_URL": b.servers.database_url,
        "WT_REDIS_URL": b.servers.redis_url,
        "WT_REDIS_PREFIX": "wbsuite-wt:",
    }
    ceiling = start_app(group, CEILING, "bench.apps.ceiling", app_env)
    through = start_app(group, WRITE_THROUGH, "bench.apps.write_through", app_env)
    wb = await start_target(group, WBCACHE, "bench")
    for t in (ceiling, through):
        await wait_http(t.api[0], t.port, "/healthz")
    targets = [ceiling, through, wb]
    print(f"prefill: PUT {opts.keys:,} keys once into each app ...")
    for t in targets:
        await prefill(t, opts.keys, opts.doc_bytes)
    await wait_drained(wb)
    await settle(b)
    return targets


async def settle(b: Bench) -> None:
    """After a bulk load: vacuum and checkpoint now, so that autovacuum and a checkpoint
    do not land in the first measured runs."""
    conn = await asyncpg.connect(b.servers.database_url)
    try:
        await conn.execute("VACUUM ANALYZE records")
        await conn.execute("VACUUM ANALYZE wt_records")
        with contextlib.suppress(asyncpg.PostgresError):  # needs pg_checkpoint or superuser
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    await asyncio.sleep(2)


async def section_main(b: Bench, targets: list[Target], out: dict[str, Any]) -> None:
    opts = b.opts
    first = len(b.runs)
    await b.rotated(targets, opts.reps, "side by side", opts.ops)
    names = [t.name for t in targets]
    runs = b.runs[first:]
    out["runs"] = [r.as_dict() for r in runs]
    out["table"] = aggregate(runs, names, opts.connections)


def redis_benchmark(url: str, pipeline: int, log: Path) -> dict[str, Any]:
    parts = urlsplit(url)
    argv = ["redis-benchmark", "-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
    db = parts.path.lstrip("/") or "0"
    argv += ["--dbnum", db, "-t", "set", "-n", "200000", "-d", "200", "-r", "10000", "-q"]
    if parts.password:
        argv += ["-a", parts.password]
    if pipeline > 1:
        argv += ["-P", str(pipeline)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    text = done.stdout + done.stderr
    with log.open("a") as f:
        f.write(f"$ {' '.join(a if a != parts.password else '***' for a in argv)}\n{text}\n")
    m = re.findall(r"SET: ([\d.]+) requests per second", text)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"redis-benchmark failed:\n{text[-1000:]}")
    return {"pipeline": pipeline, "clients": 50, "sets_per_s": float(m[-1])}


async def section_batch(b: Bench, wb: Target, out: dict[str, Any]) -> None:
    opts = b.opts
    # One batch by hand first: every operation must succeed, not only the request.
    ops = [
        {
            "op": "put",
            "collection": wb.collection,
            "key": core.key_name(i),
            "document": orjson.loads(core.document(i, opts.doc_bytes)),
        }
        for i in range(opts.batch_ops)
    ]
    conn = Connection("127.0.0.1", wb.port)
    try:
        status, body = await conn.send(
            encode_request(
                "POST",
                "/v1/batch",
                f"127.0.0.1:{wb.port}",
                orjson.dumps({"operations": ops}),
                (("Content-Type", "application/json"),),
            )
        )
    finally:
        await conn.close()
    statuses = Counter(r["status"] for r in orjson.loads(body)["results"]) if status == 200 else {}
    if status != 200 or set(statuses) - {200, 201}:
        raise RuntimeError(f"POST /v1/batch: {status}, operations {dict(statuses)}")
    by_conns: dict[str, Any] = {}
    for c in opts.batch_connections:
        print(f"batch: POST /v1/batch with {opts.batch_ops} puts, {c} connections")
        runs = [(await b.measure(wb, "batch", c, rep)).result for rep in range(opts.reps)]
        rps = med([r["rps"] for r in runs]) or 0.0
        # Operations that failed inside a 200 answer (their own status) do not count.
        ok = med([(r["requests"] * opts.batch_ops - r["op_errors"]) / r["seconds"] for r in runs])
        by_conns[str(c)] = {
            "runs": runs,
            "requests_per_s": rps,
            "writes_per_s": ok,
            "failed_operations": sum(r["op_errors"] for r in runs),
            "operations": sum(r["requests"] * opts.batch_ops for r in runs),
            "p50_ms": med([r["p50_ms"] for r in runs]),
            "p99_ms": med([r["p99_ms"] for r in runs]),
            "api_cpu_us_per_write": round(
                (med([r["api_cpu_us_per_req"] for r in runs]) or 0) / opts.batch_ops, 1
            ),
            "errors": sum(r["non_2xx_3xx"] + r["socket_errors"] for r in runs),
        }
    print("batch: redis-benchmark -t set on the same Redis ...")
    log = b.log_dir / "redis-benchmark.log"
    plain = redis_benchmark(b.servers.redis_url, 1, log)
    piped = redis_benchmark(b.servers.redis_url, 16, log)
    # redis-benchmark's keys (key:000000012345) are not the service's: drop them.
    for k in b.redis.scan_iter(match="key:*", count=1000):
        b.redis.delete(k)
    out["batch"] = {
        "ops_per_request": opts.batch_ops,
        "by_connections": by_conns,
        "redis_benchmark_set": plain,
        "redis_benchmark_set_p16": piped,
    }
    for conns, r in by_conns.items():
        print(
            f"  {conns} conns: {r['writes_per_s'] or 0:,.0f} writes/s through /v1/batch "
            f"({r['failed_operations']:,} of {r['operations']:,} operations failed)"
        )
    print(f"  redis-benchmark SET {plain['sets_per_s']:,.0f}/s, -P 16 {piped['sets_per_s']:,.0f}/s")


# Frames of the process' start-up, under which everything runs: not worth listing.
_BOOT: tuple[str, ...] = ("runpy", "typer/", "click/", "uvicorn/main.py", "uvicorn/server.py")
_BOOT += ("uvicorn/__main__",)
_BOOT += ("uvicorn/_compat", "service/cli.py", "asyncio/runners.py", "asyncio/base_events.py")


def summarize_folded(path: Path, top: int = 25) -> dict[str, Any]:
    """Shares of the samples of a py-spy ``--format raw`` profile (samples of a running
    thread: CPU time): by owner (the first non-stdlib frame from the leaf up: the library
    or service module that spent it), the top leaf functions, and the top functions
    inclusive of what they call (service functions listed separately)."""
    owner: Counter[str] = Counter()
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_fn[frames[-1]] += count
        owner[_owner(frames)] += count
        for f in set(frames):
            incl_fn[f] += count

    def share(items: list[tuple[str, int]]) -> list[list[Any]]:
        return [[name, round(100 * v / total, 1)] for name, v in items] if total else []

    inclusive = [(f, n) for f, n in incl_fn.most_common() if not any(b in f for b in _BOOT)]
    service = [(f, n) for f, n in inclusive if "(service/" in f or "(worker/" in f]
    return {
        "samples": total,
        "by_owner_pct": share(owner.most_common(20)),
        "self_top_pct": share(self_fn.most_common(top)),
        "inclusive_top_pct": share(inclusive[: top * 2]),
        "service_inclusive_pct": share(service[:top]),
    }


_OWNERS = (
    ("redis/", "redis-py"),
    ("hiredis", "redis-py"),
    ("asyncpg/", "asyncpg"),
    ("arq/", "arq"),
    ("uvicorn/", "uvicorn"),
    ("httptools", "uvicorn"),
    ("starlette/", "fastapi+starlette"),
    ("fastapi/", "fastapi+starlette"),
    ("prometheus_client/", "prometheus_client"),
    ("pydantic", "pydantic"),
    ("opentelemetry", "fastapi+starlette"),
    ("trace/", "fastapi+starlette"),
)


def _owner(frames: list[str]) -> str:
    """Who spent a sample: the first frame from the leaf up that is not the standard
    library, as a library name or a service module (``service/api/http``)."""
    for frame in reversed(frames):
        if any(b in frame for b in _BOOT):
            continue
        m = re.search(r"\(([^)]*)\)\s*$", frame)
        path = m.group(1) if m else frame
        for marker, name in _OWNERS:
            if marker in path:
                return name
        for local in ("service/", "worker/", "bench/"):
            if path.startswith(local) or f"/{local}" in path:
                return path[path.index(local) :].removesuffix(".py")
    return "event loop (uvloop/asyncio)"


async def profile(b: Bench, target: Target, op: str, connections: int) -> dict[str, Any]:
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(binary).exists():
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    name = target.name.replace(" ", "_").replace("+", "x")
    folded = b.log_dir / f"profile-{name}-{op}-c{connections}.folded"
    seconds = b.opts.profile_seconds
    argv = [binary, "record", "--pid", str(target.api[0].pid), "--rate", "200", "--nolineno"]
    argv += ["--duration", str(round(seconds + 1)), "--format", "raw", "--nonblocking"]
    argv += ["--output", str(folded)]
    with (b.log_dir / "py-spy.log").open("ab") as log:
        spy = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
        try:
            await asyncio.sleep(0.5)
            run = await b.measure(target, op, connections, -1, seconds)
            await asyncio.wait_for(spy.wait(), timeout=60)
        finally:
            if spy.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    spy.kill()
                await spy.wait()
    b.runs.remove(run)
    if not folded.exists():
        return {"error": f"py-spy wrote nothing (see {b.log_dir / 'py-spy.log'})"}
    summary = summarize_folded(folded)
    summary["run_under_profiler"] = run.result
    summary["folded"] = str(folded)
    return summary


async def section_profile(b: Bench, targets: list[Target], out: dict[str, Any]) -> None:
    c = min(b.opts.connections)
    out["profiles"] = {}
    for target, op in [(t, op) for t in targets for op in ("put", "get")]:
        print(f"profile: py-spy on {target.name} API, {op.upper()} at {c} connections ...")
        out["profiles"][f"{target.name} {op}"] = await profile(b, target, op, c)


async def section_scaling(b: Bench, one: Target, out: dict[str, Any]) -> None:
    """2 API processes + 2 workers, on their own Redis prefix, against the 1 + 1."""
    opts = b.opts
    env = service_env(b.servers.redis_url, b.servers.database_url, PREFIX2, opts.service_env)
    group = ProcessGroup(b.log_dir / "scaling", env)
    try:
        await _scaling(b, one, group, out)
    finally:
        group.stop_all()


async def _scaling(b: Bench, one: Target, group: ProcessGroup, out: dict[str, Any]) -> None:
    opts = b.opts
    two = await start_target(group, WBCACHE_2X2, "bench2", api_workers=2, workers=2, prefix=PREFIX2)
    print(f"scaling: prefill {opts.keys:,} keys into {two.name} ...")
    await prefill(two, opts.keys, opts.doc_bytes)
    await wait_drained(two)
    await settle(b)
    first = len(b.runs)
    await b.rotated([one, two], opts.scaling_reps, "scaling")
    runs = b.runs[first:]
    names = [one.name, two.name]
    agg: dict[str, Any] = {}
    for op in ("put", "get"):
        for c in opts.connections:
            rows = {
                n: med(
                    [r.result["rps"] for r in runs if (r.target, r.op, r.connections) == (n, op, c)]
                )
                for n in names
            }
            p99 = {
                n: med(
                    [
                        r.result["p99_ms"]
                        for r in runs
                        if (r.target, r.op, r.connections) == (n, op, c)
                    ]
                )
                for n in names
            }
            base, scaled = rows[one.name], rows[two.name]
            agg[f"{op} c{c}"] = {
                "1+1_rps": base,
                "2+2_rps": scaled,
                "2+2_x_1+1": round(scaled / base, 3) if base and scaled else None,
                "1+1_p99_ms": p99[one.name],
                "2+2_p99_ms": p99[two.name],
            }
    out["scaling"] = {
        "runs": [r.as_dict() for r in runs],
        "table": agg,
        "rss": {**rss_report(one.procs), **rss_report(two.procs, "2x2-")},
    }


async def section_drain(
    b: Bench, pg: asyncpg.Connection, out: dict[str, Any], sweep: bool = False
) -> None:
    """bench/core.py's cold drain (next to the raw batched upsert) and hot burst, with
    default settings; with ``sweep``, the cold drain per BATCH_SIZE and the hot burst per
    WRITE_DELAY_MS instead."""
    opts = b.opts
    base_args = [
        "--keys",
        str(opts.drain_keys),
        "--hot-writes",
        str(opts.hot_writes),
        "--hot-keys",
        str(opts.hot_keys),
        "--redis-url",
        b.servers.redis_url,
        "--database-url",
        b.servers.database_url,
    ]
    if not sweep:
        out["drain"] = await _core_phases(b, pg, base_args, opts.service_env, "drain", True, True)
        return
    results: dict[str, Any] = {"batch_size": {}, "write_delay_ms": {}}
    for size in opts.batch_sizes:
        env = {**opts.service_env, "BATCH_SIZE": str(size)}
        print(f"sweep: cold drain with BATCH_SIZE={size} ...")
        results["batch_size"][str(size)] = await _core_phases(
            b, pg, base_args, env, f"sweep-b{size}", True, False
        )
    for delay in opts.write_delays:
        env = {**opts.service_env, "WRITE_DELAY_MS": str(delay)}
        print(f"sweep: hot burst with WRITE_DELAY_MS={delay} ...")
        results["write_delay_ms"][str(delay)] = await _core_phases(
            b, pg, base_args, env, f"sweep-d{delay}", False, True
        )
    out["sweep"] = results


async def _core_phases(
    b: Bench,
    pg: asyncpg.Connection,
    args: list[str],
    env_extra: dict[str, str],
    name: str,
    cold: bool,
    hot: bool,
) -> dict[str, Any]:
    copts = core.parse_args([*args, *(f"--service-env={k}={v}" for k, v in env_extra.items())])
    env = service_env(b.servers.redis_url, b.servers.database_url, f"wbsuite-{name}:", env_extra)
    group = ProcessGroup(b.log_dir / name, env)
    meter = core.Meter(group, b.redis, pg, b.servers.database_url)
    api: core.Api | None = None
    result: dict[str, Any] = {"service_env": env_extra}
    try:
        await pg.execute("TRUNCATE records, tombstones")
        proc, port = group.api()
        api = core.Api(proc, port)
        await api.wait_ready()
        idle_since = now()
        if cold:
            docs = [core.document(i, copts.doc_bytes) for i in range(copts.keys)]
            print(f"  cold load: {copts.keys:,} keys, no worker ...")
            load, cpu0, cpu1 = await core.phase_cold_load(copts, api, meter, docs)
            print(f"  raw baseline: {copts.keys:,} rows, batches of {copts.batch} ...")
            raw = await core.phase_raw(pg, copts, docs)
            print("  cold drain: one worker ...")
            drain, idle_since = await core.phase_cold_drain(
                copts, api, group, pg, meter, raw["rows_per_s"]
            )
            drain["load"] = load.summary()
            drain["cpu_load"] = cpu_breakdown(cpu0, cpu1)
            result["raw"] = raw
            result["cold"] = drain
            print(
                f"  raw {raw['rows_per_s']:,.0f} rows/s, drain {drain['rows_per_s'] or 0:,.0f} "
                f"rows/s ({drain['ratio_to_raw']} x raw)"
            )
        else:
            group.worker()
        if hot:
            print(f"  hot burst: {copts.hot_writes:,} PUTs over {copts.hot_keys:,} keys ...")
            result["hot"] = h = await core.phase_hot(copts, api, group, pg, meter, idle_since)
            print(
                f"  {h['accepted_per_s']:,.0f} writes/s, {h['row_writes_per_accepted_write']} "
                f"row writes/write, pending 0 after {h['drain_s']:.2f} s"
            )
        result["rss"] = rss_report(group.procs)
        return result
    finally:
        if api is not None:
            with contextlib.suppress(Exception):
                await api.close()
        group.stop_all()


# --------------------------------------------------------------------------- report


def targets_verdict(results: dict[str, Any]) -> dict[str, Any]:
    """Each target: the measured value, the bound, and whether it holds (None: not run)."""
    t: dict[str, Any] = {}
    table = results.get("main", {}).get("table", {})
    conns = results["config"]["connections"]
    ops = results["config"].get("ops", ["put", "get"])

    def add(name: str, value: float | None, bound: float, at_least: bool, errors: int = 0) -> None:
        ok = None if value is None else (value >= bound if at_least else value <= bound)
        if errors:  # non-2xx answers or socket errors in a compared run: no pass
            ok = False
        t[name] = {"value": value, "bound": bound, "at_least": at_least, "ok": ok}
        t[name] |= {"errors": errors} if errors else {}

    def errors(op: str, c: int, other: str) -> int:
        return sum(table.get(f"{op} c{c} {n}", {}).get("errors", 0) for n in (WBCACHE, other))

    for c in conns:
        for op in [op for op in OPS if op in ops]:
            wb, name = table.get(f"{op} c{c} {WBCACHE}", {}), op_label(op)
            bound = {"get": T_GET_VS_CEILING, "put": T_PUT_VS_CEILING}.get(
                op, T_UNCACHED_PUT_VS_CEILING
            )
            e_ceil = errors(op, c, CEILING)
            add(f"{name} c{c} / ceiling {name}", wb.get("x_ceiling"), bound, True, e_ceil)
            if op == "get":
                continue
            bound, e_wt = T_PUT_VS_WRITE_THROUGH, errors(op, c, WRITE_THROUGH)
            add(f"{name} c{c} / write-through {name}", wb.get("x_write_through"), bound, True, e_wt)
    c0 = min(conns)
    add(
        f"PUT p99 c{c0} / ceiling PUT p99",
        table.get(f"put c{c0} {WBCACHE}", {}).get("p99_x_ceiling"),
        T_PUT_P99_VS_CEILING,
        False,
        errors("put", c0, CEILING),
    )
    drain = results.get("drain", {}).get("cold", {})
    add("cold drain / raw upsert", drain.get("ratio_to_raw"), T_DRAIN_VS_RAW, True)
    batch = results.get("batch", {}).get("by_connections", {}).get(str(T_BATCH_CONNECTIONS), {})
    add(
        f"/v1/batch writes/s at c{T_BATCH_CONNECTIONS}",
        batch.get("writes_per_s"),
        T_BATCH_WRITES_PER_S,
        True,
        batch.get("failed_operations", 0),
    )
    api_mb, worker_mb = peak_rss(results)
    add("API peak RSS (MB)", api_mb, T_RSS_MB, False)
    add("worker peak RSS (MB)", worker_mb, T_RSS_MB, False)
    return t


def peak_rss(results: dict[str, Any]) -> tuple[float | None, float | None]:
    """The highest VmHWM of any single wbcache API process and worker process."""
    api: list[float] = []
    worker: list[float] = []
    reports = [
        results.get("rss", {}),
        results.get("scaling", {}).get("rss", {}),
        results.get("drain", {}).get("rss", {}),
    ]
    for report in reports:
        for name, r in report.items():
            if name.startswith(("api-", "2x2-api-")):
                # serve --workers N: the uvicorn children serve; the parent supervises.
                api.append(max(r["children_vmhwm_mb"]) if r["children_vmhwm_mb"] else r["max_mb"])
            elif name.startswith(("worker-", "2x2-worker-")):
                worker.append(r["max_mb"])
    return (max(api) if api else None, max(worker) if worker else None)


def op_label(op: str) -> str:
    """``put`` -> ``PUT``, ``put-random`` -> ``PUT-random``."""
    verb, dash, rest = op.partition("-")
    return verb.upper() + dash + rest


def _f(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}{suffix}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    cfg = results["config"]
    main = results.get("main")
    if main:
        lines.append(
            f"side by side: medians of {cfg['reps']} repetitions x {cfg['duration']:g} s, "
            f"wrk -t1, {cfg['keys']:,} keys, ~{cfg['doc_bytes']} B documents"
            + (
                f"; PUT-random over {cfg['random_keys']:,} keys, PUT-insert of new keys"
                if {"put-random", "put-insert"} & set(cfg.get("ops", []))
                else ""
            )
        )
        header = (
            "op",
            "conns",
            "app",
            "req/s",
            "x ceiling",
            "x w-thru",
            "p50 ms",
            "p99 ms",
            "p99 x ceil",
            "API µs/req",
            "worker µs/req",
            "wrk CPU",
            "pending@end",
            "errors",
        )
        rows: list[tuple[str, ...]] = []
        for key, e in main["table"].items():
            op, c, name = key.split(" ", 2)
            rows.append(
                (
                    op_label(op),
                    c[1:],
                    name,
                    _f(e["rps"]),
                    _f(e.get("x_ceiling"), 2),
                    _f(e.get("x_write_through"), 2),
                    _f(e["p50_ms"], 1),
                    _f(e["p99_ms"], 1),
                    _f(e.get("p99_x_ceiling"), 2),
                    _f(e["api_cpu_us_per_req"]),
                    _f(e.get("worker_cpu_us_per_req")),
                    _f(e.get("wrk_cpu_share"), 2),
                    _f(e.get("pending_at_end")),
                    _f(e["errors"]),
                )
            )
        lines += _grid(header, rows)
        lines.append("")
    batch = results.get("batch")
    if batch:
        rb, rbp = batch["redis_benchmark_set"], batch["redis_benchmark_set_p16"]
        for c, r in batch["by_connections"].items():
            failed = r["failed_operations"]
            lines.append(
                f"POST /v1/batch ({batch['ops_per_request']} puts, {c} conns): "
                f"{_f(r['requests_per_s'])} req/s = {_f(r['writes_per_s'])} writes/s "
                f"({(r['writes_per_s'] or 0) / rb['sets_per_s']:.3f} x redis-benchmark SET), "
                f"p99 {_f(r['p99_ms'], 1)} ms, API {_f(r['api_cpu_us_per_write'])} µs/write"
                + (f", {failed:,} of {r['operations']:,} operations FAILED" if failed else "")
            )
        lines.append(
            f"redis-benchmark -t set -d 200 (50 clients): {_f(rb['sets_per_s'])}/s, "
            f"-P 16: {_f(rbp['sets_per_s'])}/s"
        )
    scaling = results.get("scaling")
    if scaling:
        parts = [
            f"{k.upper()}: {_f(v['1+1_rps'])} -> {_f(v['2+2_rps'])} ({_f(v['2+2_x_1+1'], 2)}x)"
            for k, v in scaling["table"].items()
        ]
        lines.append("2 API + 2 workers vs 1 + 1 (req/s): " + "; ".join(parts))
    drain = results.get("drain")
    if drain:
        raw, cold, hot = drain["raw"], drain["cold"], drain["hot"]
        lines.append(
            f"cold drain ({cold['keys']:,} keys): {_f(cold['rows_per_s'])} rows/s vs raw "
            f"upsert {_f(raw['rows_per_s'])} rows/s = {_f(cold['ratio_to_raw'], 2)}x; "
            f"hot burst: {_f(hot['accepted_per_s'])} writes/s, "
            f"{_f(hot['row_writes_per_accepted_write'], 3)} Postgres row writes per accepted "
            f"write, pending 0 {_f(hot['drain_s'], 2)} s after"
        )
    api_mb, worker_mb = peak_rss(results)
    if api_mb is not None or worker_mb is not None:
        lines.append(f"peak RSS (VmHWM): API {_f(api_mb, 1)} MB, worker {_f(worker_mb, 1)} MB")
    sweep = results.get("sweep")
    if sweep:
        for size, r in sweep["batch_size"].items():
            lines.append(
                f"sweep BATCH_SIZE={size}: drain {_f(r['cold']['rows_per_s'])} rows/s, raw "
                f"{_f(r['raw']['rows_per_s'])} rows/s = {_f(r['cold']['ratio_to_raw'], 2)}x"
            )
        for delay, r in sweep["write_delay_ms"].items():
            h = r["hot"]
            lines.append(
                f"sweep WRITE_DELAY_MS={delay}: {_f(h['accepted_per_s'])} writes/s, "
                f"{_f(h['row_writes_per_accepted_write'], 3)} row writes/write, pending 0 "
                f"{_f(h['drain_s'], 2)} s after the burst"
            )
    if results.get("cost"):
        lines.append(cost.render(results["cost"]))
    profiles = results.get("profiles")
    if profiles:
        lines.append("")
        for name, prof in profiles.items():
            if "error" in prof:
                lines.append(f"profile {name}: {prof['error']}")
                continue
            us = prof["run_under_profiler"]["api_cpu_us_per_req"]
            pk = ", ".join(f"{n} {p * us / 100:.0f}" for n, p in prof["by_owner_pct"][:7])
            lines.append(f"profile {name}: API {us:.0f} µs/req = {pk} ...")
    verdict = results.get("targets", {})
    if verdict:
        lines.append("")
        width = max(len(name) for name in verdict)
        for name, v in verdict.items():
            bound = f"{'>=' if v['at_least'] else '<='} {v['bound']:g}"
            state = "-" if v["ok"] is None else ("PASS" if v["ok"] else "MISS")
            state += f" ({v['errors']:,} errors)" if v.get("errors") else ""
            lines.append(f"target {name:<{width}} {_f(v['value'], 2):>8}  {bound:<8} {state}")
    return "\n".join(lines)


def _grid(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "-" * len(out[0]))
    return out


# --------------------------------------------------------------------------- main


async def run(opts: Options, servers: Servers, log_dir: Path) -> dict[str, Any]:
    b = Bench(opts, servers, log_dir)
    pg = await asyncpg.connect(servers.database_url)
    env = service_env(servers.redis_url, servers.database_url, PREFIX, opts.service_env)
    group = ProcessGroup(log_dir / "main", env)
    results: dict[str, Any] = {}
    try:
        results["postgres"] = await core.pg_facts(pg)
        results["redis"] = core.redis_facts(b.redis)
        results["background_cpu_busy"] = await core.background_busy()
        results["load_average_before"] = [round(v, 2) for v in os.getloadavg()]
        await pg.execute("TRUNCATE records, tombstones")
        await pg.execute("DROP TABLE IF EXISTS wt_records")
        sections = opts.sections
        if {"main", "batch", "profile", "scaling"} & set(sections):
            targets = await start_apps(b, group)
            wb = targets[-1]
            if "main" in sections:
                main: dict[str, Any] = {}
                results["main"] = main
                await section_main(b, targets, main)
            if "batch" in sections:
                await section_batch(b, wb, results)
            if "profile" in sections:
                await section_profile(b, targets, results)
            results["rss"] = rss_report(group.procs)
            for t in targets[:2]:
                t.api[0].stop()
            if "scaling" in sections:
                await section_scaling(b, wb, results)
            group.stop_all()
        if "drain" in sections:
            print("drain: bench/core.py's cold drain and hot burst, default settings ...")
            await section_drain(b, pg, results)
        if "sweep" in sections:
            await section_drain(b, pg, results, sweep=True)
        if "cost" in sections:
            copts = cost.suite_options(
                opts.cost_points, opts.doc_bytes, opts.service_env, opts.quick
            )
            results["cost"] = await cost.measure(copts, servers, pg, log_dir / "cost")
        results["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
        return results
    finally:
        group.stop_all()
        await pg.close()
        b.close()


def prepare(servers: Servers) -> None:
    client = redis.Redis.from_url(servers.redis_url)
    try:
        client.flushdb()
    finally:
        client.close()
    migrate(servers.database_url)


async def _main_task(opts: Options, servers: Servers, log_dir: Path) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await run(opts, servers, log_dir)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def markdown(results: dict[str, Any]) -> str:
    """The side-by-side table (and the scaling table) as Markdown, for docs."""
    out = [
        "| op | conns | app | req/s | × ceiling | × write-through | p50 ms | p99 ms "
        "| p99 × ceiling | API µs/req | worker µs/req | errors |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, e in results.get("main", {}).get("table", {}).items():
        op, c, name = key.split(" ", 2)
        bold = "**" if name == WBCACHE else ""
        out.append(
            f"| {op_label(op)} | {c[1:]} | {bold}{name}{bold} | {_f(e['rps'])} "
            f"| {bold}{_f(e.get('x_ceiling'), 2)}{bold} | {_f(e.get('x_write_through'), 2)} "
            f"| {_f(e['p50_ms'], 1)} | {_f(e['p99_ms'], 1)} | {_f(e.get('p99_x_ceiling'), 2)} "
            f"| {_f(e['api_cpu_us_per_req'])} | {_f(e.get('worker_cpu_us_per_req'))} "
            f"| {_f(e['errors'])} |"
        )
    scaling = results.get("scaling", {}).get("table")
    if scaling:
        out += [
            "",
            "| op | conns | 1 API + 1 worker req/s | 2 API + 2 workers req/s | ratio "
            "| p99 ms 1+1 | p99 ms 2+2 |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, v in scaling.items():
            op, c = key.split(" ")
            out.append(
                f"| {op.upper()} | {c[1:]} | {_f(v['1+1_rps'])} | {_f(v['2+2_rps'])} "
                f"| {_f(v['2+2_x_1+1'], 2)} | {_f(v['1+1_p99_ms'], 1)} | {_f(v['2+2_p99_ms'], 1)} |"
            )
    return "\n".join(out)


def report(paths: list[Path], as_markdown: bool) -> int:
    """Print a finished run's tables again (``--report FILE``); with several files, the
    side-by-side table over all their repetitions (medians), then each run's own."""
    runs_of = [json.loads(p.read_text()) for p in paths]
    results = runs_of[-1]
    if len(runs_of) > 1:
        merged = [
            Run(r["target"], r["op"], r["connections"], r["rep"], r)
            for res in runs_of
            for r in res.get("main", {}).get("runs", [])
        ]
        names = [CEILING, WRITE_THROUGH, WBCACHE]
        conns = sorted({r.connections for r in merged})
        n_ops = len({r.op for r in merged})
        results = {
            **results,
            "config": {**results["config"], "reps": len(merged) // (len(conns) * n_ops * 3)},
            "main": {"table": aggregate(merged, names, conns)},
        }
        print(f"medians over {len(paths)} runs: {', '.join(str(p) for p in paths)}")
        for key in ("batch", "scaling", "drain", "profiles", "rss", "targets"):
            results.pop(key, None)
    print(render(results))
    if as_markdown:
        print()
        print(markdown(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--report", type=Path, nargs="+")
    pre.add_argument("--markdown", action="store_true")
    known, rest = pre.parse_known_args(argv)
    if known.report is not None:
        return report(known.report, known.markdown)
    opts = parse_args(rest)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    log_dir = opts.results_dir / f"suite-{stamp}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    servers: Servers | None = None
    try:
        servers = start_servers(opts.redis_url, opts.database_url)
        for note in servers.notes:
            print(note)
        prepare(servers)
        with asyncio.Runner(loop_factory=core._new_loop) as runner:
            measured = runner.run(_main_task(opts, servers, log_dir))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every process the suite started is stopped", file=sys.stderr)
        return 130
    finally:
        if servers is not None:
            servers.close()

    results: dict[str, Any] = {
        "started_at": started_at,
        "git": core.git_revision(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "config": {
            "sections": opts.sections,
            "duration": opts.duration,
            "warmup": opts.warmup,
            "reps": opts.reps,
            "connections": opts.connections,
            "keys": opts.keys,
            "ops": opts.ops,
            "random_keys": opts.random_keys,
            "doc_bytes": opts.doc_bytes,
            "drain_keys": opts.drain_keys,
            "hot_writes": opts.hot_writes,
            "hot_keys": opts.hot_keys,
            "batch_ops": opts.batch_ops,
            "batch_connections": opts.batch_connections,
            "scaling_reps": opts.scaling_reps,
            "service_env": opts.service_env,
            "redis": core._safe_url(servers.redis_url),
            "database": core._safe_url(servers.database_url),
            "throwaway_servers": servers.notes,
            "quick": opts.quick,
        },
        **measured,
        "logs": str(log_dir),
    }
    results["targets"] = targets_verdict(results)
    out = opts.results_dir / f"suite-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(
        f"wbcache suite  {started_at}  git {results['git']}  {results['machine']['cpus']} CPUs  "
        f"PostgreSQL {results['postgres']['version']}  Redis {results['redis']['version']}  "
        f"(machine {results['background_cpu_busy']:.0%} busy before start, load average "
        f"{results['load_average_before'][0]:.2f})"
    )
    print(render(results))
    print()
    print(f"results: {out}")
    print(f"logs:    {log_dir}")
    verdicts = [v["ok"] for v in results["targets"].values() if v["ok"] is not None]
    if opts.check and not all(verdicts):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
