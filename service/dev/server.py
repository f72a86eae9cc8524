"""The lifecycle shared by the embedded servers (service.dev.embedded): start, stop, kill,
restart, the pid file that finds a server again after its owner died, and the atexit hook
that stops what is still running when the interpreter exits."""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, ClassVar, Self

import psutil
import redis

from service.dev import processes

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class EmbeddedServerError(RuntimeError):
    """A server could not be found, started or stopped."""


def wait_until(
    predicate: Callable[[], bool], deadline: float, what: str, logs: Sequence[Path]
) -> None:
    """Poll ``predicate`` every 50 ms until it holds; past ``deadline`` (monotonic clock)
    raise EmbeddedServerError naming ``what``, the last error the predicate raised (a node
    not answering yet) and the servers' ``logs``."""
    last: Exception | None = None
    while True:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError, KeyError, StopIteration) as exc:
            last = exc
        if time.monotonic() > deadline:
            listed = "\n".join(str(path) for path in logs)
            raise EmbeddedServerError(f"timed out waiting for {what} ({last}); logs:\n{listed}")
        time.sleep(0.05)


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


def same_binary(proc: psutil.Process, binary: Path) -> bool:
    try:
        exe = proc.exe().removesuffix(" (deleted)")
    except psutil.Error:
        return False
    return bool(exe) and os.path.realpath(exe) == os.path.realpath(binary)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


_RUNNING: set[ServerProcess] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for server in list(_RUNNING):
        if server._owner_pid != os.getpid():
            continue  # a forked child that inherited the registry: not its servers
        try:
            server.stop(timeout=10)
        except Exception:  # best effort at interpreter exit
            log.exception("could not stop %r at exit", server)


class ServerProcess:
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
        return proc if proc is not None and same_binary(proc, binary) else None

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
