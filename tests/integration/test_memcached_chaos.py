"""Faults under memcached load: workers SIGKILLed, Redis restarted (AOF). ``STORED`` means
what a 2xx means: every acknowledged set reaches Postgres unless a later set of the same
key supersedes it; a failure while Redis is down is a ``SERVER_ERROR`` line, the
connection stays open. Real ``wbcache serve --memcached-port`` and ``wbcache worker``
processes, started and killed with test_chaos.py's helpers."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from service.api.memcached.values import decode
from service.core import documents
from service.dev.embedded import RedisServer, free_port
from tests.integration.test_chaos import Procs, _alive, _api, _collection, _logs
from tests.support.servers import TestServers as Servers

pytestmark = pytest.mark.chaos


@dataclass
class _Set:
    value: bytes
    flags: int
    acked: bool  # STORED; else the outcome is unknown (SERVER_ERROR, connection lost)


@dataclass
class McLoad:
    """Clients each setting their own keys in turn (so a key's sets are totally ordered),
    mixing binary values with flags and canonical JSON documents."""

    port: int
    collection: str
    clients: int = 16
    keys_per_client: int = 15
    history: dict[str, list[_Set]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    dropped: int = 0  # connections lost: the server must never drop one

    def keys(self, client: int) -> list[str]:
        return [f"{self.collection}:c{client}k{j}" for j in range(self.keys_per_client)]

    @property
    def acked(self) -> int:
        return self.counts["STORED"]

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._client(i, stop) for i in range(self.clients)))

    async def _client(self, client: int, stop: asyncio.Event) -> None:
        rng = random.Random(client)
        keys = self.keys(client)
        seq = 0
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                while not stop.is_set():
                    seq += 1
                    key = keys[seq % len(keys)]
                    if seq % 3:
                        value, flags = rng.randbytes(rng.randint(0, 300)), seq % 7
                    else:
                        value, flags = documents.dumps({"client": client, "seq": seq}), 0
                    writer.write(
                        b"set %s %d 0 %d\r\n%s\r\n" % (key.encode(), flags, len(value), value)
                    )
                    entry = _Set(value, flags, acked=False)
                    self.history.setdefault(key, []).append(entry)
                    line = await asyncio.wait_for(reader.readline(), 15)
                    if not line:
                        raise ConnectionResetError("closed by the server")
                    self.counts[line.split(b" ", 1)[0].strip().decode()] += 1
                    entry.acked = line == b"STORED\r\n"
                    if line.startswith(b"SERVER_ERROR"):
                        await asyncio.sleep(0.05)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                self.dropped += 1
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def check(self, api_url: str, database_url: str, drain_timeout: float = 45) -> list[str]:
        """After the queue drained: Postgres holds, for every key, its last STORED value or
        a later set whose outcome was unknown; memcached reads the same bytes back."""
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + drain_timeout
            while (await http.get(f"{api_url}/v1/stats")).json()["pending"]:
                assert time.monotonic() < deadline, "the queue did not drain"
                await asyncio.sleep(0.1)
        conn = await asyncpg.connect(database_url)
        try:
            rows = {
                r["key"]: decode(documents.from_postgres(r["value"]))
                for r in await conn.fetch(
                    "SELECT key, value::text AS value FROM records WHERE collection = $1",
                    self.collection,
                )
            }
        finally:
            await conn.close()
        problems = []
        for key, sets in self.history.items():
            last = max((i for i, s in enumerate(sets) if s.acked), default=None)
            row = rows.get(key.partition(":")[2])
            if last is None:
                continue
            allowed = [(s.value, s.flags) for s in sets[last:]]
            if row not in allowed:
                problems.append(
                    f"{key}: Postgres holds {row!r:.80}, last STORED {allowed[0]!r:.80}"
                )
                continue
            got = await self._get(key)
            if got != row:
                problems.append(f"{key}: memcached answers {got!r:.80}, Postgres {row!r:.80}")
        return problems

    async def _get(self, key: str) -> tuple[bytes, int] | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"get %s\r\n" % key.encode())
            head = await reader.readline()
            if head == b"END\r\n":
                return None
            _, _, flags, size = head.split()
            value = (await reader.readexactly(int(size) + 2))[:-2]
            assert await reader.readline() == b"END\r\n"
            return value, int(flags)
        finally:
            writer.close()
            await writer.wait_closed()


async def _wait(predicate: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


async def test_worker_sigkill_under_memcached_load_loses_nothing_stored(
    procs: Procs, servers: Servers, pg: asyncpg.Connection
) -> None:
    port = free_port()
    api = _api(procs, MEMCACHED_PORT=str(port))
    workers = [procs("worker"), procs("worker")]
    load = McLoad(port, _collection())
    stop = asyncio.Event()
    task = asyncio.create_task(load.run(stop))
    kills = 0
    try:
        await _wait(lambda: load.acked >= 500, f"too few sets acknowledged: {load.counts}")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 8:
            victim = workers.pop(0)
            victim.kill()
            kills += 1
            workers.append(procs("worker"))
            await asyncio.sleep(1.5)
        acked = load.acked
        await _wait(lambda: load.acked >= acked + 300, f"load stalled: {load.counts}")
    finally:
        stop.set()
        await task
    problems = await load.check(api.url, servers.database_url)
    print(f"\n{kills} SIGKILLs; {dict(load.counts)}; dropped={load.dropped}")
    assert not problems, problems[:20]
    assert load.dropped == 0 and set(load.counts) == {"STORED"}, load.counts
    assert all(_alive(w) for w in workers), _logs(*workers)


async def test_redis_restart_under_memcached_load_loses_nothing_stored(
    procs: Procs, servers: Servers, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True)
    await asyncio.to_thread(server.start)
    try:
        port = free_port()
        api = _api(procs, redis_url=server.url, MEMCACHED_PORT=str(port))
        workers = [procs("worker", redis_url=server.url), procs("worker", redis_url=server.url)]
        load = McLoad(port, _collection())
        stop = asyncio.Event()
        task = asyncio.create_task(load.run(stop))
        try:
            await _wait(lambda: load.acked >= 800, f"too few sets acknowledged: {load.counts}")
            await asyncio.to_thread(server.stop)
            # While Redis is down, sets answer SERVER_ERROR on open connections.
            await _wait(
                lambda: load.counts["SERVER_ERROR"] >= 50, f"no SERVER_ERROR: {load.counts}"
            )
            await asyncio.to_thread(server.start)  # same port, data from the AOF
            acked = load.acked
            await _wait(lambda: load.acked >= acked + 800, f"no recovery: {load.counts}")
        finally:
            stop.set()
            await task
        assert all(_alive(w) for w in workers), _logs(*workers)
        problems = await load.check(api.url, servers.database_url)
        print(f"\n{dict(load.counts)}; dropped={load.dropped}")
        assert not problems, problems[:20]
        assert load.dropped == 0, "the server dropped a connection instead of answering"
    finally:
        await asyncio.to_thread(server.stop)
