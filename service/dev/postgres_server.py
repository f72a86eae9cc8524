"""A private PostgreSQL cluster for tests and ``wbcache up`` (see service.dev.embedded)."""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from service.dev import processes
from service.dev.binaries import find_postgres_bindir
from service.dev.server import HOST, EmbeddedServerError, ServerProcess, same_binary, tail

log = logging.getLogger(__name__)

PG_ROLE = "postgres"
PG_DATABASE = "postgres"


class PostgresServer(ServerProcess):
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
                f"initdb failed ({code}); log {self.log_path}:\n{tail(self.log_path)}"
            )

    def _postmaster(self, since: float) -> psutil.Process | None:
        """The live postmaster named by ``postmaster.pid`` (its first line) if it started
        after ``since`` (a file left by a killed server may name a pid now reused)."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        proc = processes.find(pid)
        if proc is None or not processes.alive(proc) or not same_binary(proc, self.binary):
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
                f"log {self.log_path}:\n{tail(self.log_path)}"
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
