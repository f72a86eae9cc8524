"""``wbcache up`` as a user runs it: real processes, embedded servers, restarts, a SIGKILL of
``up`` itself (orphans cleaned by the next run), and external servers from the environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.dev import processes
from service.dev.embedded import free_port
from tests.conftest import wait_until
from tests.support.servers import TestServers as Servers
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


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``wbcache <args>`` run in ``cwd``, as a user runs it after ``make up``."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def put_and_persist(client: httpx.AsyncClient, base: str, key: str, doc: object) -> int:
    r = await client.put(f"{base}/v1/uptest/{key}", json=doc)
    assert r.status_code == 201, r.text
    version = int(r.json()["version"])

    async def persisted() -> bool:
        stats = (await client.get(f"{base}/v1/stats")).json()
        assert stats["dead_letters"] == 0, stats
        return bool(stats["pending"] == 0)

    await wait_until(persisted, 30, interval=0.1)
    return version


async def test_up_embedded_restart_and_orphans(
    workdir: Path,
    up_env: dict[str, str],
    cleanup: list[tuple[UpProc, Started]],
) -> None:
    cwd = workdir
    data_dir = cwd / ".wbcache"
    port = free_port()
    doc = {"name": "Ada", "tags": ["x", "y"], "n": 1.5}

    async with httpx.AsyncClient(timeout=10) as client:
        # 1. First start: embedded servers (initdb), migrations, API, worker.
        up = UpProc(cwd, data_dir, port, up_env).start()
        cleanup.append((up, {}))
        await up.wait_ready(client)
        pids = up.started()
        cleanup[-1] = (up, pids)
        assert {"api", "worker", "redis", "postgres"} <= set(pids)
        banner = up.output()
        for expected in (
            up.url,
            f"{up.url}/docs",
            f"{up.url}/dashboard",
            "redis://127.0.0.1:",
            "postgresql://postgres@127.0.0.1:",
            str(data_dir / "api.log"),
            str(data_dir / "worker.log"),
        ):
            assert expected in banner, f"{expected!r} missing from the banner:\n{banner}"
        # up runs in its own session; its children each in theirs (a terminal Ctrl-C
        # reaches only up)
        for name in ("api", "worker", "redis", "postgres"):
            assert os.getsid(pids[name]["pid"]) == pids[name]["pid"]

        version = await put_and_persist(client, up.url, "ada", doc)
        got = await client.get(f"{up.url}/v1/uptest/ada")
        assert got.status_code == 200 and got.json() == doc

        # The operator commands, run as the README writes them (no URL) in the directory
        # where up runs, talk to up's servers (they used to read the default Redis).
        status = cli(cwd, up_env, "status", "--json")
        assert status.returncode == 0, status
        assert f"started by `wbcache up` (pid {up.pid}" in status.stderr, status.stderr
        seen = json.loads(status.stdout)
        assert seen["pending"] == 0 and seen["workers"] == 1 and seen["served"], seen
        drained = cli(cwd, up_env, "drain")
        assert drained.returncode == 0 and "drained" in drained.stdout, drained
        health = cli(cwd, up_env, "healthcheck")
        assert health.returncode == 0 and "API healthy" in health.stdout, health

        # Ctrl-C: everything stops, exit 0, nothing left running.
        up.popen.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert await up.wait_exit() == 0, up.output()
        left = {n: r["pid"] for n, r in pids.items() if not gone(r)}
        assert not left, f"left running after Ctrl-C: {left}\n{up.output()}"
        assert not (data_dir / "up.json").exists()
        assert "[api]" in up.output() and "[worker]" in up.output()

        # 2. Restart on the same data directory: the record survived, in Postgres too.
        up = UpProc(cwd, data_dir, port, up_env).start()
        cleanup.append((up, {}))
        await up.wait_ready(client)
        pids = up.started()
        cleanup[-1] = (up, pids)
        got = await client.get(f"{up.url}/v1/uptest/ada")
        assert got.status_code == 200, got.text
        assert got.json() == doc
        assert got.headers["etag"] == f'"{version}"'
        pg_port = read_json(data_dir / "postgres" / "wbcache-postgres.pid")["port"]
        conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{pg_port}/wbcache")
        try:
            row = await conn.fetchrow(
                "SELECT value, version FROM records WHERE collection = 'uptest' AND key = 'ada'"
            )
        finally:
            await conn.close()
        assert row is not None and json.loads(row["value"]) == doc
        assert row["version"] == version
        doc2 = {**doc, "n": 2}
        version2 = await put_and_persist(client, up.url, "bob", doc2)

        # 3. SIGKILL of up itself: its children live on as orphans...
        up.popen.kill()  # type: ignore[union-attr]
        assert await up.wait_exit() == -signal.SIGKILL
        orphans = pids
        alive = [n for n in ("api", "worker", "redis", "postgres") if not gone(orphans[n])]
        assert alive == ["api", "worker", "redis", "postgres"]

        # ...and the next up finds them through the pid files and stops them first.
        up = UpProc(cwd, data_dir, port, up_env).start()
        cleanup.append((up, {}))
        await up.wait_ready(client)
        pids = up.started()
        cleanup[-1] = (up, pids)
        left = {n: r["pid"] for n, r in orphans.items() if not gone(r)}
        assert not left, f"orphans of the killed run still running: {left}\n{up.output()}"
        assert "previous `wbcache up` left running" in up.output()
        for key, want, v in (("ada", doc, version), ("bob", doc2, version2)):
            got = await client.get(f"{up.url}/v1/uptest/{key}")
            assert got.status_code == 200 and got.json() == want
            assert got.headers["etag"] == f'"{v}"'

        up.popen.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert await up.wait_exit() == 0, up.output()
        left = {n: r["pid"] for n, r in pids.items() if not gone(r)}
        assert not left, f"left running after Ctrl-C: {left}\n{up.output()}"


async def test_up_uses_servers_from_the_environment(
    tmp_path: Path,
    servers: Servers,
    prefix: str,
    up_env: dict[str, str],
    cleanup: list[tuple[UpProc, Started]],
) -> None:
    env = {
        **up_env,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "REDIS_PREFIX": prefix,
    }
    data_dir = tmp_path / ".wbcache"
    key = f"ext-{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(timeout=10) as client:
        up = UpProc(tmp_path, data_dir, free_port(), env).start()
        cleanup.append((up, {}))
        await up.wait_ready(client)
        pids = up.started()
        cleanup[-1] = (up, pids)
        # no embedded server: up's only children are the API and the worker
        assert set(pids) == {"api", "worker"}
        assert sorted(descendants(up.pid)) == sorted([pids["api"]["pid"], pids["worker"]["pid"]])
        assert not (data_dir / "redis").exists() and not (data_dir / "postgres").exists()
        assert "embedded" not in up.output()
        assert servers.redis_url in up.output()

        # a second up on the same data directory refuses to run next to the first
        second = UpProc(tmp_path, data_dir, free_port(), env).start()
        cleanup.append((second, {}))
        assert await second.wait_exit(30) == 2
        assert "another `wbcache up`" in second.output()
        assert up.returncode() is None

        version = await put_and_persist(client, up.url, key, {"external": True})
        conn = await asyncpg.connect(servers.database_url)
        try:
            row = await conn.fetchrow(
                "SELECT version FROM records WHERE collection = 'uptest' AND key = $1", key
            )
            await conn.execute("DELETE FROM records WHERE collection = 'uptest' AND key = $1", key)
        finally:
            await conn.close()
        assert row is not None and row["version"] == version

        up.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert await up.wait_exit() == 0, up.output()
        left = {n: r["pid"] for n, r in pids.items() if not gone(r)}
        assert not left, f"left running after SIGTERM: {left}\n{up.output()}"


async def test_up_stops_everything_when_a_child_dies(
    tmp_path: Path,
    servers: Servers,
    prefix: str,
    up_env: dict[str, str],
    cleanup: list[tuple[UpProc, Started]],
) -> None:
    env = {
        **up_env,
        "REDIS_URL": servers.redis_url,
        "DATABASE_URL": servers.database_url,
        "REDIS_PREFIX": prefix,
    }
    async with httpx.AsyncClient(timeout=10) as client:
        up = UpProc(tmp_path, tmp_path / ".wbcache", free_port(), env).start()
        cleanup.append((up, {}))
        await up.wait_ready(client)
        pids = up.started()
        cleanup[-1] = (up, pids)
    os.kill(pids["worker"]["pid"], signal.SIGKILL)
    assert await up.wait_exit() == 1
    out = up.output()
    assert f"the worker (pid {pids['worker']['pid']}) exited unexpectedly" in out, out
    last_line = (tmp_path / ".wbcache" / "worker.log").read_text().splitlines()[-1]
    assert last_line in out.split("exited unexpectedly", 1)[1]  # with its last log lines
    assert gone(pids["api"]), out


async def test_up_refuses_a_busy_port(
    tmp_path: Path,
    up_env: dict[str, str],
    cleanup: list[tuple[UpProc, Started]],
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        data_dir = tmp_path / ".wbcache"
        up = UpProc(tmp_path, data_dir, port, up_env).start()
        cleanup.append((up, {}))
        code = await up.wait_exit(30)
    assert code != 0
    assert f"127.0.0.1:{port}" in up.output() and "already in use" in up.output()
    # nothing was started
    assert not (data_dir / "redis").exists() and not (data_dir / "postgres").exists()
    assert not (data_dir / "up.json").exists()
