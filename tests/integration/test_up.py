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
from pathlib import Path

import asyncpg
import httpx
from pymemcache.client.base import Client as PyMemcache

from service.core import documents
from service.dev.embedded import free_port
from tests.conftest import wait_until
from tests.support.servers import TestServers as Servers
from tests.support.up import (
    Started,
    UpProc,
    cleanup,
    descendants,
    gone,
    read_json,
    run_in,
    up_env,
    workdir,
)

__all__ = ["cleanup", "up_env", "workdir"]  # fixtures


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``wbcache <args>`` run in ``cwd``, as a user runs it after ``make up``."""
    return run_in(cwd, env, [sys.executable, "-m", "service.cli", *args])


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
            f"memcached  127.0.0.1:{up_env['MEMCACHED_PORT']}",
        ):
            assert expected in banner, f"{expected!r} missing from the banner:\n{banner}"
        # up runs in its own session; its children each in theirs (a terminal Ctrl-C
        # reaches only up)
        for name in ("api", "worker", "redis", "postgres"):
            assert os.getsid(pids[name]["pid"]) == pids[name]["pid"]

        version = await put_and_persist(client, up.url, "ada", doc)
        got = await client.get(f"{up.url}/v1/uptest/ada")
        assert got.status_code == 200 and got.json() == doc
        # The memcached door reads the same record.
        mc = PyMemcache(("127.0.0.1", int(up_env["MEMCACHED_PORT"])), timeout=10)
        try:
            assert mc.get("uptest:ada") == documents.dumps(doc)
        finally:
            mc.close()

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
