"""``wbcache up``: everything for a laptop in one command.

For each of ``REDIS_URL`` / ``DATABASE_URL`` that is unset, an embedded server
(service.dev.embedded) keeps its data under the data directory; then the migrations, the API
(``python -m service.cli serve``) and one worker (``python -m service.cli worker``) as child
processes.  Ctrl-C or SIGTERM stops the API, lets the worker drain the queue for a bounded
time, stops the worker, then the embedded servers, and exits 0.

Layout of the data directory (default ``.wbcache/`` in the working directory)::

    up.lock           held (flock) while an ``up`` runs on this directory
    up.json           pids, start times and argv of this run's API and worker, and the
                      URLs of its API, Redis and Postgres (service.dev.up_state: what
                      ``status``, ``drain``, ``dlq`` and ``healthcheck`` run here use)
    ports.json        the embedded servers' ports, reused on the next start when free
    api.log           the API's output (also forwarded to stdout as ``[api] ...``)
    worker.log        the worker's output (``[worker] ...``)
    redis/            embedded Redis: AOF, redis.log, pid file
    postgres/         embedded PostgreSQL: pgdata, postgres.log, pid file

Every child runs in a session of its own, so a terminal's Ctrl-C reaches only ``up``, which
decides the order.  When ``up`` itself was SIGKILLed, its children live on; the next ``up``
on the same directory finds them through ``up.json`` and the servers' pid files (checking
the command line and start time, so a reused pid is never killed) and stops them first.
Process control goes through psutil (service.dev.processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import psutil

from service.dev import processes
from service.dev.child import Child, same_process
from service.dev.embedded import EmbeddedServerError, PostgresServer, RedisServer, free_port
from service.dev.server import tail
from service.dev.up_state import STATE_FILE, urls_record
from service.redaction import redact_url

DATABASE = "wbcache"
API_START_SECONDS = 60.0
API_STOP_SECONDS = 20.0  # uvicorn finishes in-flight requests within 10 s
DRAIN_SECONDS = 15.0  # after the API stopped: let the worker persist what is pending
WORKER_STOP_SECONDS = 30.0  # the worker finishes or hands back its batch
ORPHAN_STOP_SECONDS = 30.0


class UpError(RuntimeError):
    """Something could not start; the message says what and where to look."""


def _say(message: str, stream: TextIO | None = None) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"[up] {message}", file=stream or sys.stdout, flush=True)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _port_free(host: str, port: int) -> str | None:
    """None if a server could bind ``host:port`` now (as uvicorn does, SO_REUSEADDR), else
    the reason."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        return f"cannot resolve {host!r}: {exc}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "it is already in use"
            return str(exc)
    return None


def _client_host(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


# The memcached protocol's well-known port: `wbcache up` serves it there when it is free.
MEMCACHED_DEFAULT_PORT = 11211


def _memcached_port(bind: str) -> tuple[int | None, str]:
    """The memcached port `up` serves (MEMCACHED_PORT, else 11211 when free), or None and
    why not."""
    configured = os.environ.get("MEMCACHED_PORT")
    if configured:
        return int(configured), ""
    problem = _port_free(bind, MEMCACHED_DEFAULT_PORT)
    if problem is None:
        return MEMCACHED_DEFAULT_PORT, ""
    return None, f"port {MEMCACHED_DEFAULT_PORT} is not free ({problem}); set MEMCACHED_PORT"


def _http_base(host: str, port: int) -> str:
    h = _client_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def _preload() -> None:
    for module in ("service.adapters.migrate", "service.core.stats", "service.adapters.redis"):
        with contextlib.suppress(Exception):
            importlib.import_module(module)


class Up:
    """One run of ``wbcache up``."""

    def __init__(self, host: str, port: int, data_dir: Path) -> None:
        self.host = host
        self.port = port
        self.data_dir = data_dir.expanduser().absolute()
        self.state_path = self.data_dir / STATE_FILE
        self.ports_path = self.data_dir / "ports.json"
        self.redis: RedisServer | None = None
        self.postgres: PostgresServer | None = None
        self.redis_url = ""
        self.database_url = ""
        python = [sys.executable, "-m", "service.cli"]
        serve = [*python, "serve", "--host", host, "--port", str(port)]
        self.memcached_bind = os.environ.get("MEMCACHED_BIND", "127.0.0.1")
        self.memcached_port, self.memcached_off = _memcached_port(self.memcached_bind)
        if self.memcached_port is not None and "MEMCACHED_PORT" not in os.environ:
            serve += ["--memcached-port", str(self.memcached_port)]
        self.api = Child("api", serve, self.data_dir / "api.log")
        self.worker = Child("worker", [*python, "worker"], self.data_dir / "worker.log")
        self.signals = 0
        self.stopping = False
        self.interruptible = False

    # -- signals ------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        if not self.stopping and (self.interruptible or self.signals > 1):
            raise KeyboardInterrupt

    def _hurry(self) -> Iterator[bool]:
        """True once another Ctrl-C arrives while stopping (do not wait any longer)."""
        first = self.signals
        while True:
            yield self.signals > first

    # -- main ---------------------------------------------------------------------------

    def run(self) -> int:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.data_dir / "up.lock", "a+")  # held for the whole run
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read_json(self.state_path).get("pid", "?")
                _say(
                    f"another `wbcache up` (pid {other}) is running on {self.data_dir}; "
                    "stop it first or use --data-dir",
                    sys.stderr,
                )
                return 2
            previous = {
                sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                return self._run()
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        finally:
            lock.close()

    def _run(self) -> int:
        code = 0
        try:
            self._cleanup_previous_run()
            problem = _port_free(self.host, self.port)
            if problem is not None:
                _say(
                    f"cannot serve the API on {self.host}:{self.port}: {problem}. "
                    "Stop what uses it or choose another port with --port.",
                    sys.stderr,
                )
                return 2
            self._start()
            if not self.signals:
                code = self._supervise()
        except KeyboardInterrupt:
            _say("interrupted while starting")
        except (UpError, EmbeddedServerError) as exc:
            _say(f"could not start: {exc}", sys.stderr)
            code = 1
        finally:
            self.stopping = True
            self._stop_all()
        if code == 0:
            _say("stopped")
        return code

    # -- previous run -------------------------------------------------------------------

    def _cleanup_previous_run(self) -> None:
        """Stop what a killed ``up`` left running on this data directory: its API and worker
        first (the worker hands back its batch to Redis), then the embedded servers."""
        state = _read_json(self.state_path)
        children = state.get("children")
        orphans: dict[str, psutil.Process] = {}
        if isinstance(children, dict):
            for name, record in children.items():
                proc = same_process(record) if isinstance(record, dict) else None
                if proc is not None:
                    orphans[str(name)] = proc
        if orphans:
            listed = ", ".join(f"{name} pid {proc.pid}" for name, proc in orphans.items())
            _say(f"stopping what a previous `wbcache up` left running: {listed}")
            # SIGTERM: the worker hands its batch back to Redis before it exits
            if processes.stop(list(orphans.values()), signal.SIGTERM, ORPHAN_STOP_SECONDS):
                raise UpError(f"processes of a previous run survived SIGKILL: {listed}")
        self.state_path.unlink(missing_ok=True)
        for cls, sub in ((RedisServer, "redis"), (PostgresServer, "postgres")):
            pid = cls.cleanup_orphan(self.data_dir / sub)
            if pid is not None:
                _say(f"stopped the {sub} server (pid {pid}) a previous `wbcache up` left running")

    # -- start --------------------------------------------------------------------------

    def _embedded_port(self, kind: str) -> int:
        """The port this kind used last time if it is free, so URLs stay the same."""
        previous = _read_json(self.ports_path).get(kind)
        if isinstance(previous, int) and _port_free("127.0.0.1", previous) is None:
            return previous
        return free_port()

    def _save_ports(self) -> None:
        ports = _read_json(self.ports_path)
        for kind, server in (("redis", self.redis), ("postgres", self.postgres)):
            if server is not None:
                ports[kind] = server.port
        _write_json(self.ports_path, ports)

    def _save_state(self) -> None:
        _write_json(
            self.state_path,
            {
                **processes.identity(os.getpid()),
                "children": {
                    c.name: c.record() for c in (self.api, self.worker) if c.pid is not None
                },
                **urls_record(_http_base(self.host, self.port), self.redis_url, self.database_url),
            },
        )

    def _start(self) -> None:
        # Alembic and SQLAlchemy take seconds to import on a busy laptop: do it while the
        # servers start (the import lock makes the later imports wait for this one).
        threading.Thread(target=_preload, name="wbcache-up-preload", daemon=True).start()
        redis_url = os.environ.get("REDIS_URL", "")
        if not redis_url:
            _say("REDIS_URL is not set: starting an embedded Redis")
            self.redis = RedisServer(self.data_dir / "redis", self._embedded_port("redis"))
            self.redis.start()
            redis_url = self.redis.url
        if self.signals:
            return
        database_url = os.environ.get("DATABASE_URL", "")
        if not database_url:
            _say("DATABASE_URL is not set: starting an embedded PostgreSQL")
            self.postgres = PostgresServer(
                self.data_dir / "postgres", self._embedded_port("postgres"), fsync=True
            )
            self.postgres.start()
            database_url = _with_database(self.postgres.url, DATABASE)
        self._save_ports()
        self.redis_url, self.database_url = redis_url, database_url
        if self.signals:
            return

        _say(f"migrating {redact_url(database_url)}")
        from service.adapters.migrate import migrate

        self.interruptible = True
        try:
            migrate(database_url)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            raise UpError(f"migrations failed on {redact_url(database_url)}: {exc!r}") from exc
        finally:
            self.interruptible = False
        if self.signals:
            return

        env = dict(os.environ)
        env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, PYTHONUNBUFFERED="1")
        env.setdefault("WORKER_HEARTBEAT_FILE", str(self.data_dir / "worker.heartbeat"))
        for child in (self.api, self.worker):
            child.start(env)
            self._save_state()
        self._wait_api()
        if not self.signals:
            self._banner()

    def _wait_api(self) -> None:
        url = _http_base(self.host, self.port) + "/readyz"
        deadline = time.monotonic() + API_START_SECONDS
        while not self.signals:
            self._pump()
            self._check_children()
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError:
                pass  # 503: Redis not answering yet
            except OSError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                raise UpError(
                    f"the API did not become ready at {url} within {API_START_SECONDS:g} s; "
                    f"last lines of {self.api.log_path}:\n{tail(self.api.log_path)}"
                )
            time.sleep(0.1)

    def _banner(self) -> None:
        base = _http_base(self.host, self.port)

        def where(server: RedisServer | PostgresServer | None) -> str:
            if server is None:
                return "(from the environment)"
            return f"(embedded, data and log in {server.data_dir})"

        lines = [
            "wbcache is up",
            f"  API        {base}"
            + ("" if _client_host(self.host) == self.host else f"  (listening on {self.host})"),
            f"  docs       {base}/docs",
            f"  dashboard  {base}/dashboard",
            f"  memcached  {self.memcached_bind}:{self.memcached_port}  (no authentication)"
            if self.memcached_port is not None
            else f"  memcached  off: {self.memcached_off}",
            f"  Redis      {redact_url(self.redis_url)}  {where(self.redis)}",
            f"  Postgres   {redact_url(self.database_url)}  {where(self.postgres)}",
            f"  logs       {self.api.log_path} and {self.worker.log_path}"
            " (also shown here as [api] / [worker] lines)",
            f"  pids       api {self.api.pid}, worker {self.worker.pid}, up {os.getpid()}",
            "Press Ctrl-C to stop (the worker persists pending writes first).",
        ]
        with contextlib.suppress(OSError, ValueError):
            print("\n".join(lines), flush=True)

    # -- run ----------------------------------------------------------------------------

    def _pump(self) -> None:
        for child in (self.api, self.worker):
            child.pump(sys.stdout)

    def _check_children(self) -> None:
        for child in (self.api, self.worker):
            if child.popen is not None and child.popen.poll() is not None:
                self._pump()
                raise UpError(
                    f"the {child.name} (pid {child.popen.pid}) exited unexpectedly with code "
                    f"{child.popen.returncode}; last lines of {child.log_path}:\n"
                    f"{tail(child.log_path)}"
                )
        for server in (self.redis, self.postgres):
            if server is not None and not server.running:
                raise UpError(
                    f"the embedded {server.kind} server exited unexpectedly; last lines of "
                    f"{server.log_path}:\n{tail(server.log_path)}"
                )

    def _supervise(self) -> int:
        try:
            while not self.signals:
                self._pump()
                self._check_children()
                time.sleep(0.1)
        except UpError as exc:
            _say(str(exc), sys.stderr)
            _say("stopping everything", sys.stderr)
            return 1
        _say("stopping: API first, then the worker, then the servers")
        return 0

    # -- stop ---------------------------------------------------------------------------

    def _pending(self) -> int | None:
        """Writes not yet persisted, or None if Redis cannot say."""
        from service.adapters.redis import close_redis, connect_redis
        from service.config import Settings
        from service.core import stats
        from service.core.shards import Shards

        settings = Settings(redis_url=self.redis_url, database_url=self.database_url)

        async def collect() -> int:
            redis = connect_redis("up", settings)
            try:
                s = await stats.collect(redis, Shards.from_settings(settings))
                return int(s["pending"])
            finally:
                await close_redis(redis)

        try:
            return asyncio.run(collect())
        except Exception:
            return None

    def _drain(self, hurry: Iterator[bool]) -> None:
        """With the API stopped, give the worker a bounded time to persist what is pending
        (what is left stays queued in Redis and is persisted on the next start)."""
        if not self.worker.running or not self.redis_url:
            return
        deadline = time.monotonic() + DRAIN_SECONDS
        said = False
        while True:
            pending = self._pending()
            if pending is None or pending == 0:
                return
            if not said:
                _say(f"waiting up to {DRAIN_SECONDS:g} s for {pending} pending writes to persist")
                said = True
            if time.monotonic() >= deadline or next(hurry) or not self.worker.running:
                _say(f"{pending} writes still pending: they stay queued in Redis")
                return
            self._pump()
            time.sleep(0.2)

    def _stop_all(self) -> None:
        hurry = self._hurry()
        try:
            self.api.stop(API_STOP_SECONDS, hurry, _say)
            self._drain(hurry)
            self.worker.stop(WORKER_STOP_SECONDS, hurry, _say)
            self._pump()
        finally:
            if self.api.pid is not None or self.worker.pid is not None:
                self.state_path.unlink(missing_ok=True)
            for server in (self.postgres, self.redis):
                if server is not None:
                    try:
                        server.stop()
                    except EmbeddedServerError as exc:
                        _say(f"could not stop the {server.kind} server: {exc}", sys.stderr)


def run(host: str, port: int, data_dir: str) -> int:
    """``wbcache up``; returns the exit code."""
    return Up(host, port, Path(data_dir)).run()
