"""The benchmark's environment: its Redis and Postgres (dedicated URLs, or throwaway servers
when those do not answer), the ``wbcache serve`` / ``wbcache worker`` processes it starts,
and CPU accounting per process (``cpu_seconds`` from service.dev.processes, through psutil)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
import redis

from service.config import Settings
from service.dev.embedded import PostgresServer, RedisServer, free_port
from service.dev.processes import cpu_seconds

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/wbcache_bench"
BENCH_PREFIX = "wbbench:"
REPO_ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


async def _postgres_answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(with_database(url, "postgres"), timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


def postgres_answers(url: str) -> bool:
    return asyncio.run(_postgres_answers(url))


@dataclass
class Servers:
    redis_url: str
    database_url: str
    owned: list[RedisServer | PostgresServer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    temp_dir: Path | None = None

    def close(self) -> None:
        """Stop the throwaway servers and remove their data."""
        while self.owned:
            server = self.owned.pop()
            with contextlib.suppress(Exception):
                server.stop()
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None


def start_servers(redis_url: str, database_url: str) -> Servers:
    """Use the given URLs when they answer, else throwaway servers under a temp directory."""
    servers = Servers(redis_url, database_url)
    try:
        if not redis_answers(redis_url):
            servers.temp_dir = base = Path(tempfile.mkdtemp(prefix="wbcache-bench-"))
            r = RedisServer(base / "redis", appendonly=True)
            r.start()
            servers.owned.append(r)
            servers.redis_url = r.url
            servers.notes.append(f"{redis_url} did not answer: throwaway Redis at {r.url}")
        if not postgres_answers(database_url):
            if servers.temp_dir is None:
                servers.temp_dir = Path(tempfile.mkdtemp(prefix="wbcache-bench-"))
            base = servers.temp_dir
            p = PostgresServer(base / "postgres", fsync=True)
            p.start()
            servers.owned.append(p)
            servers.database_url = with_database(p.url, database_name(database_url))
            servers.notes.append(f"{database_url} did not answer: throwaway Postgres at {p.url}")
    except BaseException:
        servers.close()
        raise
    return servers


# --------------------------------------------------------------------------- processes


def _settings_env_names() -> set[str]:
    return {name.upper() for name in Settings.model_fields}


def service_env(
    redis_url: str, database_url: str, prefix: str, extra: dict[str, str]
) -> dict[str, str]:
    """The environment of a service process: the default settings (any setting inherited
    from the caller's environment is removed), the bench URLs and prefix, then ``extra``."""
    names = _settings_env_names()
    env = {k: v for k, v in os.environ.items() if k.upper() not in names}
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, REDIS_PREFIX=prefix)
    env.update(extra)
    return env


class ServiceProcess:
    """A ``python -m service.cli ...`` child in its own session (so a terminal's Ctrl-C
    reaches only the benchmark, which stops its children in order)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "service.cli", *args]
        self.env = env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (graceful: the worker hands back its batch), then SIGKILL the group."""
        popen = self.popen
        if popen is None:
            return
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of its session (uvicorn --workers children, arq), by group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(5)

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class ProcessGroup:
    """Every service process the benchmark started; ``stop_all`` is idempotent."""

    def __init__(self, log_dir: Path, env: dict[str, str], profile: bool = False) -> None:
        self.log_dir = log_dir
        self.env = env
        self.procs: list[ServiceProcess] = []
        self.profile = profile
        self.profilers: list[subprocess.Popen[bytes]] = []

    def api(self, port: int | None = None, workers: int = 1) -> tuple[ServiceProcess, int]:
        port = port or free_port()
        args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
        if workers > 1:
            args += ["--workers", str(workers)]
        proc = self._start("api", args)
        return proc, port

    def worker(self) -> ServiceProcess:
        return self._start("worker", ["worker"])

    def _start(self, kind: str, args: list[str]) -> ServiceProcess:
        n = sum(1 for p in self.procs if p.name.startswith(kind))
        name = f"{kind}-{n}"
        proc = ServiceProcess(name, args, self.env, self.log_dir / f"{name}.log")
        self.procs.append(proc)
        proc.start()
        if self.profile:
            self._profile(proc)
        return proc

    def _profile(self, proc: ServiceProcess) -> None:
        """py-spy record on ``proc`` (and its children) until it exits: folded stacks."""
        binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [binary, "record", "--pid", str(proc.pid), "--rate", "200", "--subprocesses"]
        argv += ["--format", "raw", "--output", str(self.log_dir / f"{proc.name}.folded")]
        with (self.log_dir / f"{proc.name}.py-spy.log").open("ab") as out:
            self.profilers.append(
                subprocess.Popen(
                    [*argv, "--nonblocking"],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def stop(self, proc: ServiceProcess) -> None:
        proc.stop()

    def stop_all(self) -> None:
        # Workers first (they hand their batches back), then the APIs.
        for proc in sorted(self.procs, key=lambda p: not p.name.startswith("worker")):
            with contextlib.suppress(Exception):
                proc.stop()
        # py-spy writes its output and exits once its target is gone.
        for profiler in self.profilers:
            try:
                profiler.wait(30)
            except subprocess.TimeoutExpired:
                profiler.kill()
                profiler.wait(5)


# --------------------------------------------------------------------------- CPU


def system_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (iowait counts as idle)."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    return total - idle, total


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = cast(dict[str, Any], client.info("cpu"))
    return float(info.get("used_cpu_user", 0.0)) + float(info.get("used_cpu_sys", 0.0))


@dataclass
class CpuSample:
    at: float
    system_busy: float
    per_process: dict[str, float]
    postgres: dict[int, float]
    redis: float
    bench: float


def cpu_sample(
    procs: list[ServiceProcess], redis_client: redis.Redis, pg_pids: list[int]
) -> CpuSample:
    """CPU seconds so far: the machine, each service process (with its children), the
    given Postgres backends (by pid), Redis (INFO cpu) and this process."""
    busy, _ = system_cpu_seconds()
    usage = os.times()
    try:
        redis_cpu = redis_cpu_seconds(redis_client)
    except redis.RedisError:
        redis_cpu = 0.0
    return CpuSample(
        at=time.monotonic(),
        system_busy=busy,
        per_process={p.name: cpu_seconds(p.pid) for p in procs if p.running()},
        postgres={pid: cpu_seconds(pid) for pid in pg_pids},
        redis=redis_cpu,
        bench=usage.user + usage.system,
    )


def cpu_breakdown(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """CPU seconds spent between two samples: per service process, the Postgres backends
    of the bench database, Redis, the benchmark itself, and the rest of the machine
    (Postgres' own background processes, and anything else running)."""
    out: dict[str, float] = {"wall_s": round(after.at - before.at, 3)}
    accounted = 0.0
    for name, value in after.per_process.items():
        spent = max(0.0, value - before.per_process.get(name, 0.0))
        out[name] = round(spent, 2)
        accounted += spent
    # A backend that started between the samples started from 0; one that ended is lost.
    pg = sum(max(0.0, v - before.postgres.get(pid, 0.0)) for pid, v in after.postgres.items())
    out["postgres_backends"] = round(pg, 2)
    out["redis"] = round(max(0.0, after.redis - before.redis), 2)
    out["bench_client"] = round(max(0.0, after.bench - before.bench), 2)
    accounted += pg + out["redis"] + out["bench_client"]
    busy = max(0.0, after.system_busy - before.system_busy)
    out["machine_busy"] = round(busy, 2)
    out["other"] = round(max(0.0, busy - accounted), 2)
    return out
