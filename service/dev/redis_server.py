"""A private Redis for tests and ``wbcache up`` (see service.dev.embedded)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import psutil
import redis

from service.dev.binaries import find_redis_server
from service.dev.server import HOST, EmbeddedServerError, ServerProcess, tail


class RedisServer(ServerProcess):
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
                        f"log {self.log_path}:\n{tail(self.log_path)}"
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
                            f"log {self.log_path}:\n{tail(self.log_path)}"
                        ) from None
                time.sleep(0.02)
        finally:
            client.close()
