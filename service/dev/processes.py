"""Process control through psutil, one copy for ``wbcache up``, the embedded servers, the
tests and the benchmark: is a recorded process still the same one, its process tree,
signalling a tree, waiting (with a bound) for processes to go, CPU time of a tree."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import psutil

__all__ = [
    "alive",
    "cpu_seconds",
    "find",
    "identity",
    "kill_tree",
    "recorded",
    "send",
    "stop",
    "tree",
    "wait_gone",
]

# create_time is derived from the start in clock ticks (1/100 s) plus the boot time: a
# recorded value and a fresh reading of the same process agree far closer than this, and a
# pid is never reused within it.
_SAME_START_SECONDS = 0.05


def find(pid: int) -> psutil.Process | None:
    """The process with ``pid`` if one runs now (zombies included; see ``alive``)."""
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def alive(proc: psutil.Process) -> bool:
    """True while ``proc`` runs and its pid was not taken over by a later process (psutil
    compares the start time).  A zombie of another parent (often PID 1, for servers that
    outlived their starter) counts as gone; a zombie child of ours is reaped here, and
    counts as gone only once reaped: until then the other threads of a multi-threaded
    process may still be exiting, holding its files and sockets."""
    try:
        if not proc.is_running():
            return False
        if proc.status() != psutil.STATUS_ZOMBIE:
            return True
        if proc.ppid() != os.getpid():
            return False
        proc.wait(0)
    except psutil.TimeoutExpired:
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
    except ChildProcessError:  # reaped elsewhere (subprocess.Popen.poll) meanwhile
        pass
    return False


def identity(proc: psutil.Process | int) -> dict[str, Any]:
    """What to write down to find ``proc`` again later (``recorded``)."""
    if isinstance(proc, int):
        proc = psutil.Process(proc)
    return {"pid": proc.pid, "create_time": proc.create_time()}


def recorded(record: Mapping[str, Any]) -> psutil.Process | None:
    """The process an ``identity`` record names, if that very process still runs: a pid now
    used by a process that started at another time is not it.  A record without a start
    time (an older format) is matched on the pid alone; callers check more (binary,
    command line)."""
    try:
        pid = int(record["pid"])
        created = record.get("create_time")
        created = None if created is None else float(created)
    except (KeyError, TypeError, ValueError):
        return None
    if pid <= 1 or pid == os.getpid():
        return None
    proc = find(pid)
    if proc is None or not alive(proc):
        return None
    if created is not None and abs(proc.create_time() - created) > _SAME_START_SECONDS:
        return None
    return proc


def tree(proc: psutil.Process | int) -> list[psutil.Process]:
    """``proc`` and its live descendants (collect them before a signal: children of an
    exited process are re-parented and no longer found under it)."""
    if isinstance(proc, int):
        found = find(proc)
        if found is None:
            return []
        proc = found
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def send(procs: Iterable[psutil.Process], sig: signal.Signals) -> None:
    """Send ``sig`` to each of ``procs`` that still runs (psutil refuses a reused pid)."""
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.send_signal(sig)


def _exists(proc: psutil.Process) -> bool:
    try:
        return proc.is_running()  # zombies included
    except psutil.Error:
        return False


def wait_gone(
    procs: Sequence[psutil.Process], timeout: float, *, reaped: bool = False
) -> list[psutil.Process]:
    """Poll until none of ``procs`` is ``alive`` (with ``reaped``: exists at all, zombie
    included) or ``timeout`` passed; returns those left.  (Not ``psutil.wait_procs``: it
    always waits for zombies of other parents to be reaped, which may take long.)"""
    running = _exists if reaped else alive
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in procs if running(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)


def kill_tree(proc: psutil.Process | int, timeout: float = 10) -> list[psutil.Process]:
    """SIGKILL ``proc`` and its descendants; returns those still alive after ``timeout``."""
    family = tree(proc)
    send(family, signal.SIGKILL)
    return wait_gone(family, timeout)


def stop(
    procs: Sequence[psutil.Process],
    sig: signal.Signals,
    timeout: float,
    kill_timeout: float = 10,
) -> list[psutil.Process]:
    """Ask ``procs`` to exit with ``sig`` (all at once: they stop in parallel); after
    ``timeout``, SIGKILL what is left of their trees.  Returns the survivors of SIGKILL."""
    families = [p for proc in procs for p in tree(proc)]
    send(procs, sig)
    if not wait_gone(families, timeout):
        return []
    for proc in wait_gone(procs, 0):
        families += tree(proc)
    send(families, signal.SIGKILL)
    return wait_gone(families, kill_timeout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and its live descendants (0 if it is gone)."""
    total = 0.0
    for proc in tree(pid):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total
