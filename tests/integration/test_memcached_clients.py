"""Clients nobody here wrote, against a real ``wbcache serve --memcached-port`` (uvloop,
the production protocol stack): the seed's python-memcached code run unchanged, pymemcache,
and the libmemcached command-line tools from Debian, including memccapable, libmemcached's
own conformance test of a memcached server's text protocol."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import memcache
import pytest
from pymemcache.client.base import Client as PyMemcache
from pymemcache.serde import pickle_serde

from service.dev.embedded import free_port
from tests.conftest import wait_until
from tests.support.procs import ApiProc, WorkerProc

Procs = Callable[..., ApiProc | WorkerProc]

# The seed's Memcached example (its "Basic Caching" and "Cache Invalidation" blocks),
# verbatim: it talks to 127.0.0.1:11211 and a `db` it does not define.
SEED_CODE = """
import memcache

# Connect to Memcached
mc = memcache.Client(['127.0.0.1:11211'])

def get_data(key):
    # Try to get from cache
    data = mc.get(key)
    if data:
        return data

    # Get from database
    data = db.get_data(key)

    # Cache for 1 hour
    mc.set(key, data, time=3600)

    return data

def update_data(key, value):
    # Update database
    db.update_data(key, value)

    # Invalidate cache
    mc.delete(key)
"""


class ApiWithDoor:
    def __init__(self, api: ApiProc, port: int) -> None:
        self.api = api
        self.port = port
        self.address = f"127.0.0.1:{port}"


@pytest.fixture
def door(procs: Procs, pg: asyncpg.Connection) -> ApiWithDoor:
    port = free_port()
    api = procs("api", MEMCACHED_PORT=str(port), MEMCACHED_ALLOW_FLUSH="true")
    assert isinstance(api, ApiProc)
    return ApiWithDoor(api, port)


class _Db:
    """The seed's `db`: the application's own database, counting its reads."""

    def __init__(self) -> None:
        self.rows: dict[str, Any] = {}
        self.reads = 0

    def get_data(self, key: str) -> Any:
        self.reads += 1
        return self.rows[key]

    def update_data(self, key: str, value: Any) -> None:
        self.rows[key] = value


@pytest.fixture
def seed(door: ApiWithDoor) -> Iterator[tuple[dict[str, Any], _Db]]:
    """The seed's code executed unchanged; its 127.0.0.1:11211 is this test's port (a
    python-memcached Client whose server list is rewritten, nothing else)."""

    class Client(memcache.Client):  # type: ignore[misc]
        def __init__(self, servers: list[str], *args: Any, **kwargs: Any) -> None:
            servers = [door.address if s == "127.0.0.1:11211" else s for s in servers]
            super().__init__(servers, *args, **kwargs)

    shim = types.ModuleType("memcache")
    shim.Client = Client  # type: ignore[attr-defined]
    db = _Db()
    namespace: dict[str, Any] = {"db": db}
    real = sys.modules["memcache"]
    sys.modules["memcache"] = shim
    try:
        exec(SEED_CODE, namespace)
    finally:
        sys.modules["memcache"] = real
    yield namespace, db


async def test_the_seeds_memcached_code_unchanged(
    seed: tuple[dict[str, Any], _Db], door: ApiWithDoor, procs: Procs, pg: asyncpg.Connection
) -> None:
    code, db = seed
    get_data, update_data = code["get_data"], code["update_data"]
    db.rows = {"user:1": {"name": "Ada", "langs": ["en"]}, "plain": "text value"}

    def scenario() -> None:
        # One thread: python-memcached's Client keeps its sockets per thread.
        try:
            assert get_data("user:1") == {"name": "Ada", "langs": ["en"]}
            assert get_data("user:1") == {"name": "Ada", "langs": ["en"]}
            assert get_data("plain") == "text value"
            assert get_data("plain") == "text value"
            assert db.reads == 2  # the second get_data of each came from wbcache

            update_data("user:1", {"name": "Ada L."})
            assert get_data("user:1") == {"name": "Ada L."}
            assert db.reads == 3
        finally:
            code["mc"].disconnect_all()

    await asyncio.to_thread(scenario)

    # What python-memcached stored is persisted: a pickle (flags 1) in collection "user".
    procs("worker")
    async with httpx.AsyncClient() as http:

        async def drained() -> bool:
            pending: int = (await http.get(f"{door.api.url}/v1/stats")).json()["pending"]
            return pending == 0

        await wait_until(drained, timeout=30, interval=0.1)
        body = (await http.get(f"{door.api.url}/v1/user/1")).json()
        assert body["$memcached"]["flags"] == 1  # pickle protocol 0: ASCII, kept as "text"
        assert (await http.get(f"{door.api.url}/v1/kv/plain")).json() == {
            "$memcached": {"flags": 16, "text": "text value"}  # python-memcached: str is 16
        }
    row = await pg.fetchval("SELECT value::text FROM records WHERE collection='user' AND key='1'")
    assert '"$memcached"' in row


async def test_python_memcached_types_multi_and_cas(door: ApiWithDoor) -> None:
    def run() -> None:
        mc = memcache.Client([door.address], cache_cas=True)
        try:
            assert mc.set("int", 42) and mc.get("int") == 42
            assert mc.set("bytes", bytes(range(256))) and mc.get("bytes") == bytes(range(256))
            assert mc.set("uni", "héllo ✓") and mc.get("uni") == "héllo ✓"
            assert mc.set("obj", {"a": (1, 2)}) and mc.get("obj") == {"a": (1, 2)}
            big = b"z" * 500_000
            assert mc.set("big", big) and mc.get("big") == big
            assert mc.set_multi({"m1": "1", "m2": "2"}) == []
            assert mc.get_multi(["m1", "m2", "nope"]) == {"m1": "1", "m2": "2"}
            assert mc.incr("m1", 9) == 10 and mc.decr("m1", 3) == 7
            assert mc.gets("m2") == "2"
            assert mc.cas("m2", "3")
            assert mc.gets("m2") == "3"
            other = memcache.Client([door.address])
            other.set("m2", "4")
            other.disconnect_all()
            assert not mc.cas("m2", "5")  # changed since our gets: EXISTS
            assert mc.get("m2") == "4"
            assert mc.add("m3", "x") and not mc.add("m3", "y")
            assert mc.replace("m3", "z") and mc.get("m3") == "z"
            assert mc.append("m3", "!") and mc.prepend("m3", "¡") and mc.get("m3") == "¡z!"
            assert mc.touch("m3", 60)
            assert mc.delete("m3") and mc.get("m3") is None
            stats = mc.get_stats()
            assert stats and int(stats[0][1]["cmd_get"]) > 0
        finally:
            mc.disconnect_all()

    await asyncio.to_thread(run)


async def test_pymemcache_with_its_pickle_serde(door: ApiWithDoor) -> None:
    def run() -> None:
        mc = PyMemcache(("127.0.0.1", door.port), serde=pickle_serde, default_noreply=False)
        try:
            values = {f"p:{i}": {"i": i, "blob": bytes([i]) * i} for i in range(50)}
            assert mc.set_many(values) == []
            assert mc.get_many(list(values)) == values
            assert mc.delete_many(list(values))
            assert mc.get_many(list(values)) == {}
        finally:
            mc.close()

    await asyncio.to_thread(run)


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/ensure-test-packages.sh installs libmemcached-tools"
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=120, check=False)


async def test_libmemcached_tools(door: ApiWithDoor, tmp_path: Path) -> None:
    servers = f"--servers={door.address}"
    every_byte = tmp_path / "every-byte.bin"
    every_byte.write_bytes(bytes(range(256)) * 64)

    def run() -> None:
        r = _run(_tool("memccp"), servers, "--flag=7", str(every_byte))
        assert r.returncode == 0, r.stderr
        r = _run(_tool("memccat"), servers, "every-byte.bin")
        # memccat ends what it prints with a newline of its own.
        assert r.returncode == 0 and r.stdout == every_byte.read_bytes() + b"\n", r.stderr
        r = _run(_tool("memccat"), servers, "--flag", "every-byte.bin")
        assert r.stdout.startswith(b"7"), r.stdout[:20]
        assert _run(_tool("memcexist"), servers, "every-byte.bin").returncode == 0
        assert _run(_tool("memctouch"), servers, "--expire=60", "every-byte.bin").returncode == 0
        assert _run(_tool("memcrm"), servers, "every-byte.bin").returncode == 0
        assert _run(_tool("memcexist"), servers, "every-byte.bin").returncode != 0
        r = _run(_tool("memcstat"), servers)
        assert r.returncode == 0 and b"curr_connections" in r.stdout, r.stdout
        assert _run(_tool("memcping"), servers).returncode == 0
        assert _run(_tool("memcflush"), servers).returncode == 0  # MEMCACHED_ALLOW_FLUSH

    await asyncio.to_thread(run)


async def test_memccapable_ascii_conformance(door: ApiWithDoor) -> None:
    """libmemcached's memcapable: every ASCII protocol test passes (it flushes: allowed)."""
    r = await asyncio.to_thread(
        _run, _tool("memccapable"), "-h", "127.0.0.1", "-p", str(door.port), "-a", "-t", "10"
    )
    out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
    assert r.returncode == 0 and "All tests passed" in out, out
    assert out.count("[pass]") >= 27, out
