"""The private Redis / PostgreSQL servers of service.dev.embedded: start, restart, crash,
orphans."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis

from service.dev import processes
from service.dev.embedded import EmbeddedServerError, PostgresServer, RedisServer
from tests.support.servers import data_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def server_dir() -> Iterator[Path]:
    """Server data outside pytest's own tmp_path (see tests.support.servers.data_dir)."""
    with data_dir("wbcache-embedded-test-") as path:
        yield path


def gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie nobody reaped yet counts as gone)."""
    proc = processes.find(pid)
    return proc is None or not processes.alive(proc)


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def pg(url: str, *statements: str) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [await conn.fetch(sql) for sql in statements]
        finally:
            await conn.close()

    return asyncio.run(run())


def test_redis_aof_survives_restart_and_kill(server_dir: Path) -> None:
    server = RedisServer(server_dir / "redis")
    with server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.set("k", "v1")
        first_pid = server.pid
        assert first_pid is not None and (server_dir / "redis" / "wbcache-redis.pid").exists()

        server.restart()
        assert server.pid not in (None, first_pid)
        assert client.get("k") == b"v1"

        # a crash: the write reached the AOF (page cache) before the reply, so it survives
        assert client.set("k", "v2")
        pid = server.pid
        assert pid is not None
        server.kill()
        assert server.pid is None and gone(pid) and refused(server.port)
        assert not (server_dir / "redis" / "wbcache-redis.pid").exists()

        server.start()
        assert client.get("k") == b"v2"
        client.close()
    assert server.pid is None and refused(server.port)


def test_redis_refuses_a_busy_port(server_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = RedisServer(server_dir / "redis", port=busy.getsockname()[1])
        with pytest.raises(EmbeddedServerError, match="already listens"):
            server.start()
    assert server.pid is None


def test_postgres_row_survives_restart_stop_and_kill(server_dir: Path) -> None:
    server = PostgresServer(server_dir / "pg", fsync=False)
    server.start()
    try:
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        pg(server.url, "CREATE TABLE t (v text)", "INSERT INTO t VALUES ('row')")
        first_pid = server.pid

        server.restart()
        assert server.pid not in (None, first_pid)
        assert pg(server.url, "SELECT v FROM t")[0][0]["v"] == "row"

        server.stop()
        assert server.pid is None
        with pytest.raises(OSError):
            pg(server.url, "SELECT 1")

        server.start()
        assert pg(server.url, "SELECT v FROM t")[0][0]["v"] == "row"

        # a crash of the postmaster and all its children, then crash recovery
        pid = server.pid
        assert pid is not None
        family = processes.tree(pid)
        assert len(family) > 1
        server.kill()
        assert server.pid is None and refused(server.port)
        assert not any(processes.alive(p) for p in family)
        server.start()
        assert pg(server.url, "SELECT count(*) AS n FROM t")[0][0]["n"] == 1
    finally:
        server.stop()
    assert server.pid is None and refused(server.port)


ORPHAN_SCRIPT = """
import sys, time
from pathlib import Path
from service.dev.embedded import {cls}
server = {cls}(Path(sys.argv[1]){kwargs})
server.start()
print(server.port, server.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize(
    ("cls", "kwargs"), [(RedisServer, ""), (PostgresServer, ", fsync=False")], ids=["redis", "pg"]
)
def test_cleanup_orphan(
    server_dir: Path, cls: type[RedisServer | PostgresServer], kwargs: str
) -> None:
    data_dir = server_dir / "data"
    script = textwrap.dedent(ORPHAN_SCRIPT).format(cls=cls.__name__, kwargs=kwargs)
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(data_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        port, pid = (int(x) for x in owner.stdout.readline().split())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    # the owner died without stopping its server
    assert not gone(pid) and not refused(port)

    with pytest.raises(EmbeddedServerError, match="cleanup_orphan"):
        cls(data_dir).start()

    assert cls.cleanup_orphan(data_dir) == pid
    assert gone(pid) and refused(port)
    assert cls.cleanup_orphan(data_dir) is None

    server = cls(data_dir, port=port)
    with server:
        assert server.pid is not None
