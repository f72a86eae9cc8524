"""A child process of ``wbcache up`` (the API or the worker): started in a session of its
own, its output in a log file that ``up`` follows and forwards, found again through its
record in up.json after ``up`` itself was killed."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import psutil

from service.dev import processes


@dataclass
class Child:
    """The API or the worker: a child process whose output goes to a log file that ``up``
    follows and forwards to its stdout."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    offset: int = 0
    partial: bytes = b""
    forward: bool = True

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- wbcache up: starting {' '.join(self.argv)}\n".encode())
            log.flush()
            self.offset = log.tell()  # forward what the child writes, not this header
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.identity = processes.identity(self.popen.pid)

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def record(self) -> dict[str, Any]:
        return {**self.identity, "argv": self.argv}

    def pump(self, out: TextIO) -> None:
        """Forward the log lines written since the last call, prefixed with the name."""
        if not self.forward:
            return
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
        except OSError:
            return
        if not data:
            return
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        try:
            for line in lines:
                out.write(f"[{self.name}] {line.decode(errors='replace')}\n")
            out.flush()
        except (OSError, ValueError):
            self.forward = False  # stdout is gone (closed terminal, broken pipe)

    def stop(self, timeout: float, hurry: Iterator[bool], say: Callable[[str], None]) -> None:
        """SIGTERM; SIGKILL after ``timeout`` or as soon as ``hurry`` yields True."""
        if not self.running:
            return
        assert self.popen is not None
        self.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() >= deadline or next(hurry):
                say(f"{self.name} (pid {self.popen.pid}) did not stop; killing it")
                processes.kill_tree(self.popen.pid)
                self.popen.wait(10)
                break
            time.sleep(0.05)


def same_process(record: dict[str, Any]) -> psutil.Process | None:
    """A child recorded in up.json if that very process still runs (same pid, start time
    and command line)."""
    proc = processes.recorded(record)
    try:
        if proc is None or proc.cmdline() != [str(a) for a in record["argv"]]:
            return None
    except (psutil.Error, KeyError, TypeError):
        return None
    return proc
