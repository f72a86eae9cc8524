"""``wbcache up`` run as a user runs it, for the tests of ``up`` and of the README: one
``up`` process, what it started, and the fixtures that give it a working directory and an
environment without REDIS_URL / DATABASE_URL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.dev import processes
from service.dev.embedded import free_port
from tests.conftest import wait_until
from tests.support.servers import data_dir

START_SECONDS = 60.0  # first start runs initdb (fsync on) on a loaded 2-core machine
STOP_SECONDS = 60.0


Identity = dict[str, Any]  # processes.identity(): pid and start time
Started = dict[str, Identity]


def identity(pid: int) -> Identity:
    return processes.identity(pid)


def gone(record: Identity) -> bool:
    """True if the process of ``record`` no longer runs (a zombie PID 1 has not reaped yet
    counts as gone, and so does a pid reused by another process)."""
    return processes.recorded(record) is None


def descendants(pid: int) -> list[int]:
    return [p.pid for p in processes.tree(pid)[1:]]


def read_json(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


class UpProc:
    """One ``python -m service.cli up`` process, run from ``cwd`` like a user would."""

    def __init__(self, cwd: Path, data_dir: Path, port: int, env: dict[str, str]) -> None:
        self.cwd, self.data_dir, self.port, self.env = cwd, data_dir, port, env
        self.log = cwd / f"up-{uuid.uuid4().hex[:6]}.log"
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def start(self) -> UpProc:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "service.cli",
                    "up",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                ],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def returncode(self) -> int | None:
        assert self.popen is not None
        return self.popen.poll()

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        """Until up printed its banner (it does once its API is ready), then /readyz 200.
        (Polling /readyz alone could reach the API a killed run left on the same port.)"""

        def banner() -> bool:
            if self.returncode() is not None:
                raise AssertionError(f"up exited with {self.returncode()}")
            return "wbcache is up" in self.output()

        try:
            await wait_until(banner, START_SECONDS, interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- up output:\n{self.output()[-6000:]}") from None
        r = await client.get(f"{self.url}/readyz")
        assert r.status_code == 200, r.text

    async def wait_exit(self, timeout: float = STOP_SECONDS) -> int:
        try:
            await wait_until(lambda: self.returncode() is not None, timeout, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- up output:\n{self.output()[-4000:]}") from None
        code = self.returncode()
        assert code is not None
        return code

    def started(self) -> Started:
        """Every process this ``up`` started (from its pid file and the servers' pid files),
        Postgres' own children included: name -> pid and start time."""
        found: Started = {}
        state = read_json(self.data_dir / "up.json")
        assert state["pid"] == self.pid
        children = state["children"]
        assert isinstance(children, dict) and set(children) == {"api", "worker"}
        for name, record in children.items():
            found[name] = {"pid": record["pid"], "create_time": record["create_time"]}
        for kind in ("redis", "postgres"):
            pid_file = self.data_dir / kind / f"wbcache-{kind}.pid"
            if pid_file.exists():
                record = read_json(pid_file)
                pid = record["pid"]
                assert isinstance(pid, int)
                found[kind] = {"pid": pid, "create_time": record["create_time"]}
                for i, child in enumerate(descendants(pid)):
                    found[f"{kind}-child-{i}"] = identity(child)
        for name, rec in found.items():
            assert not gone(rec), f"{name} pid {rec['pid']} is not running"
        return found


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A working directory outside pytest's tmp_path: every pytest session that starts
    chmods /tmp/pytest-of-<user> back to 0700, which would cut off the embedded Postgres
    (it runs as the ``postgres`` OS user when we are root) if other sessions run at once."""
    with data_dir("wbcache-up-test-") as path:
        yield path


@pytest.fixture
def up_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)
    env.pop("DATABASE_URL", None)
    # Not 11211, which up takes when free: tests of other checkouts may run meanwhile.
    env["MEMCACHED_PORT"] = str(free_port())
    return env


@pytest.fixture
def cleanup() -> Iterator[list[tuple[UpProc, Started]]]:
    """Whatever a failed test left running: the up processes and every pid they started."""
    runs: list[tuple[UpProc, Started]] = []
    yield runs
    for up, pids in runs:
        if up.popen is not None and up.popen.poll() is None:
            up.popen.send_signal(signal.SIGINT)
            try:
                up.popen.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                up.popen.kill()
                up.popen.wait(10)
        for rec in pids.values():
            proc = processes.recorded(rec)
            if proc is not None:
                proc.kill()


def run_in(
    cwd: Path, env: dict[str, str], argv: list[str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``argv`` run in ``cwd`` with ``env``, its output captured as text."""
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
