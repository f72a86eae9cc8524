"""Redis that answers but cannot serve: at maxmemory, a read-only replica, busy running a
script; and Redis restarted under pooled connections. Every record request answers 503
with its code and Retry-After (never 500) while Redis refuses, and nothing is lost.

Each test starts its own throwaway ``redis-server`` (never the shared one's config)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis as sync_redis
from redis.asyncio import Redis

from service.adapters.redis import create_redis
from service.api.app import create_app
from service.api.errors import response_for
from service.config import Settings
from service.dev.embedded import RedisServer
from tests.conftest import running_api, wait_until
from tests.support.procs import ApiProc, WorkerProc

Procs = Callable[..., ApiProc | WorkerProc]


@contextlib.asynccontextmanager
async def throwaway_redis(data_dir: Path, *args: str, aof: bool = False) -> AsyncIterator[Any]:
    server = RedisServer(data_dir, appendonly=aof, extra_args=list(args))
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def _version(r: httpx.Response) -> int:
    return int(r.headers["etag"].strip('"'))


def _assert_unavailable(r: httpx.Response, code: str) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text
    assert int(r.headers["retry-after"]) >= 1


async def _rows(pg: asyncpg.Connection, collection: str) -> dict[str, int]:
    rows = await pg.fetch("SELECT key, version FROM records WHERE collection = $1", collection)
    return {r["key"]: r["version"] for r in rows}


async def test_redis_at_maxmemory_answers_503_and_the_worker_drains_it(
    settings_factory: Callable[..., Settings],
    pg: asyncpg.Connection,
    procs: Procs,
    tmp_path: Path,
) -> None:
    """At maxmemory (volatile-lru, as the contract requires: pending entries have no TTL,
    so nothing is evictable) writes answer 503 redis_full, reads of cached keys and the
    stats still answer, /readyz says full; a worker started then stays up and drains
    (claim and release run at maxmemory), which makes the entries evictable, so writes are
    accepted again; every acknowledged write reaches Postgres at its version."""
    async with throwaway_redis(
        tmp_path / "redis", "--maxmemory", "6mb", "--maxmemory-policy", "volatile-lru"
    ) as server:
        settings = settings_factory(redis_url=server.url)
        collection = f"oom-{uuid.uuid4().hex[:6]}"
        blob = "x" * 16_000
        acked: dict[str, int] = {}
        async with running_api(settings) as api:
            full: httpx.Response | None = None
            for i in range(2000):
                r = await api.put(f"/v1/{collection}/k{i}", json={"i": i, "blob": blob})
                if r.status_code == 503:
                    full = r
                    break
                assert r.status_code == 201, r.text
                acked[f"k{i}"] = _version(r)
            assert full is not None, "Redis never reached maxmemory"
            _assert_unavailable(full, "redis_full")
            assert len(acked) > 50
            # Used memory hovers around the limit by a request's buffers: put the limit
            # below it, so that Redis stays full until entries become evictable.
            control = Redis(port=server.port)
            used = (await control.info("memory"))["used_memory"]
            await control.config_set("maxmemory", used - 512 * 1024)
            await control.aclose()

            # Every kind of write is refused the same way, never with a 500.
            _assert_unavailable(await api.put(f"/v1/{collection}/k0", json={"v": 2}), "redis_full")
            _assert_unavailable(await api.delete(f"/v1/{collection}/k1"), "redis_full")
            patched = await api.patch(
                f"/v1/{collection}/k2",
                content=b'{"p": 1}',
                headers={"content-type": "application/merge-patch+json"},
            )
            _assert_unavailable(patched, "redis_full")
            # Cached keys are still served; so are the operator's views.
            got = await api.get(f"/v1/{collection}/k3")
            assert got.status_code == 200, got.text
            assert got.headers["x-cache"] == "hit" and _version(got) == acked["k3"]
            stats = await api.get("/v1/stats")
            assert stats.status_code == 200, stats.text
            assert stats.json()["pending"] == len(acked)
            metrics = await api.get("/metrics")
            assert metrics.status_code == 200, metrics.text
            # A key only Postgres holds (no entry: no pending write) is read from Postgres;
            # the cache fill Redis refuses is skipped, not answered 503.
            await pg.execute(
                "INSERT INTO records (collection, key, value, version, updated_at) "
                "VALUES ($1, 'in-pg', '{\"from\": \"pg\"}', 7, now())",
                collection,
            )
            acked["in-pg"] = 7
            got = await api.get(f"/v1/{collection}/in-pg")
            assert got.status_code == 200, got.text
            assert got.headers["x-cache"] == "miss" and _version(got) == 7
            assert got.json() == {"from": "pg"}
            assert (await api.get(f"/v1/{collection}/absent")).status_code == 404
            assert (await api.get("/healthz")).status_code == 200
            ready = await api.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["redis"].startswith("full: "), ready.text
            assert ready.headers["retry-after"] == "1"

            # A worker started now must stay up and drain the full Redis.
            worker = procs("worker", redis_url=server.url)
            assert isinstance(worker, WorkerProc)

            async def drained() -> bool:
                s = (await api.get("/v1/stats")).json()
                return bool(s["pending"] == 0 and s["dead_letters"] == 0)

            try:
                await wait_until(drained, timeout=60, interval=0.2)
            except AssertionError:
                raise AssertionError(f"not drained:\n{worker.output()[-3000:]}") from None
            assert worker.popen is not None and worker.popen.poll() is None, worker.output()

            # The flushed entries are evictable now: writes are accepted again.
            async def accepted() -> bool:
                r = await api.put(f"/v1/{collection}/after", json={"blob": blob})
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "redis_full", r.text
                    return False
                assert r.status_code in (200, 201), r.text
                acked["after"] = _version(r)
                return True

            await wait_until(accepted, timeout=10, interval=0.2)
            for i in range(20):
                r = await api.put(f"/v1/{collection}/more{i}", json={"i": i, "blob": blob})
                assert r.status_code == 201, r.text
                acked[f"more{i}"] = _version(r)
            ready = await api.get("/readyz")
            assert ready.status_code == 200 and ready.json()["redis"] == "up", ready.text
            await wait_until(drained, timeout=30, interval=0.2)
            assert worker.popen.poll() is None, worker.output()
            assert "restarting the worker" not in worker.output(), worker.output()

        assert await _rows(pg, collection) == acked


async def test_readonly_replica_and_busy_script_answer_503_never_500(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """READONLY (Redis became a replica, e.g. mid-failover) and BUSY (a script past
    busy-reply-threshold) answer 503 redis_readonly / redis_busy with Retry-After."""
    collection = f"ro-{uuid.uuid4().hex[:6]}"
    async with (
        throwaway_redis(tmp_path / "primary") as primary,
        throwaway_redis(tmp_path / "replica", "--busy-reply-threshold", "100") as replica,
    ):
        async with running_api(settings_factory(redis_url=replica.url)) as api:
            put = await api.put(f"/v1/{collection}/k", json={"a": 1})
            assert put.status_code == 201, put.text

            # BUSY: a script that runs until SCRIPT KILL.
            blocker = sync_redis.Redis(port=replica.port, socket_timeout=30)
            looping = asyncio.ensure_future(asyncio.to_thread(blocker.eval, "while true do end", 0))
            control = Redis(port=replica.port)
            try:

                async def busy() -> bool:
                    try:
                        await control.ping()
                    except sync_redis.ResponseError as exc:
                        return str(exc).startswith("BUSY")
                    return False

                await wait_until(busy, timeout=10, interval=0.05)
                _assert_unavailable(
                    await api.put(f"/v1/{collection}/k", json={"a": 2}), "redis_busy"
                )
                _assert_unavailable(await api.get(f"/v1/{collection}/k"), "redis_busy")
                ready = await api.get("/readyz")
                assert ready.status_code == 503 and ready.json()["redis"].startswith("busy: ")
            finally:
                with contextlib.suppress(sync_redis.ResponseError):
                    await control.script_kill()
                with contextlib.suppress(sync_redis.ResponseError):
                    await looping
                blocker.close()
            put = await api.put(f"/v1/{collection}/k", json={"a": 3})
            assert put.status_code == 200, put.text

            # READONLY: the server becomes a replica (of a primary holding nothing).
            await control.replicaof("127.0.0.1", primary.port)

            async def synced() -> bool:
                info = await control.info("replication")
                return bool(info.get("master_link_status") == "up")

            await wait_until(synced, timeout=20, interval=0.05)
            await control.aclose()
            writes: list[tuple[str, str, Any]] = [
                ("PUT", f"/v1/{collection}/new", {"a": 1}),
                ("DELETE", f"/v1/{collection}/new", None),
                ("GET", f"/v1/{collection}/absent", None),  # a miss must fill the cache
            ]
            for method, path, body in writes:
                r = await api.request(method, path, json=body)
                assert r.status_code != 500, r.text
                if method == "DELETE" and r.status_code == 404:
                    continue  # a replica of an empty primary: nothing to delete
                _assert_unavailable(r, "redis_readonly")
            ready = await api.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert ready.json()["redis"].startswith("readonly: "), ready.text
            assert (await api.get("/v1/stats")).status_code == 200


async def test_no_spurious_503_after_a_redis_restart(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, tmp_path: Path
) -> None:
    """Connections pooled before a Redis restart are closed by the old server; once the new
    one answers, none of them may fail a request (the command was never sent on them: a
    fresh connection takes it)."""
    collection = f"rs-{uuid.uuid4().hex[:6]}"
    async with throwaway_redis(tmp_path / "redis", aof=True) as server:
        app = create_app(settings_factory(redis_url=server.url, redis_max_connections=48))
        async with app.router.lifespan_context(app):
            pool = app.state.wb.redis.connection_pool
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://wbcache") as api:

                async def put(i: int) -> httpx.Response:
                    return await api.put(f"/v1/{collection}/k{i}", json={"i": i})

                # Warm the pool: concurrent requests open every connection it may hold.
                for r in await asyncio.gather(*(put(i) for i in range(200))):
                    assert r.status_code == 201, r.text
                assert len(pool._available_connections) >= 32

                await asyncio.to_thread(server.restart)  # same port, data from the AOF
                probe = Redis(port=server.port)
                assert await probe.ping()
                await probe.aclose()

                patch_headers = {"content-type": "application/merge-patch+json"}
                answers = await asyncio.gather(
                    *(
                        api.patch(
                            f"/v1/{collection}/k{i}", content=b'{"p":1}', headers=patch_headers
                        )
                        for i in range(100)
                    ),
                    *(put(i) for i in range(100, 200)),
                    *(api.get(f"/v1/{collection}/k{i}") for i in range(200)),
                )
                failed = [
                    (r.request.method, r.status_code, r.text)
                    for r in answers
                    if r.status_code >= 300
                ]
                assert not failed, f"{len(failed)} of {len(answers)} failed: {failed[:5]}"


class _FreezingProxy:
    """A TCP proxy to Redis that can stop forwarding on the connections it holds without
    closing them: to the client, a peer that vanished without a FIN (a dead host, a NAT
    that forgot the flow). New connections are forwarded normally."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.pipes: list[asyncio.Task[None]] = []
        self.sockets: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> _FreezingProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.freeze()
        for w in self.sockets:
            w.close()
        assert self.server is not None
        self.server.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.sockets += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            self.pipes.append(asyncio.create_task(self._pipe(src, dst)))

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()

    def freeze(self) -> None:
        for task in self.pipes:
            task.cancel()
        self.pipes.clear()


async def test_a_failed_health_check_reconnects_instead_of_failing_the_command(
    settings_factory: Callable[..., Settings], servers: Any, prefix: str
) -> None:
    """A pooled connection whose peer went silent (no FIN): the health-check PING before
    the command times out, so the command was not sent; it goes out on a new connection."""
    target = httpx.URL(servers.redis_url)
    assert target.host and target.port
    async with _FreezingProxy(target.host, target.port) as proxy:
        url = f"redis://127.0.0.1:{proxy.port}{target.path}"
        client = create_redis(
            "test", settings_factory(redis_url=url), health_check_interval=0.2, socket_timeout=0.5
        )
        try:
            await asyncio.gather(*(client.set(f"{prefix}k{i}", i) for i in range(8)))
            pool = client.connection_pool
            held = len(pool._available_connections)
            assert held >= 4
            proxy.freeze()
            loop = asyncio.get_running_loop()
            await wait_until(
                lambda: all(loop.time() > c.next_health_check for c in pool._available_connections),
                timeout=5,
            )
            values = await asyncio.gather(*(client.get(f"{prefix}k{i}") for i in range(held)))
            assert values == [str(i).encode() for i in range(held)]
        finally:
            await client.delete(*(f"{prefix}k{i}" for i in range(8)))
            await client.aclose(close_connection_pool=True)


async def test_a_busy_pool_waits_for_a_connection_then_fails_clearly(
    settings_factory: Callable[..., Settings],
) -> None:
    """All connections busy: a command waits for one (no "Too many connections"), and past
    the pool's timeout fails with a ConnectionError that says why (the API's 503)."""
    client = create_redis("test", settings_factory(redis_max_connections=1), timeout=0.5)
    pool = client.connection_pool
    try:
        held = await pool.get_connection()

        async def release_soon() -> None:
            await asyncio.sleep(0.1)  # the scenario: the holder finishes a little later
            await pool.release(held)

        releasing = asyncio.ensure_future(release_soon())
        assert await client.ping()
        await releasing

        held = await pool.get_connection()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(sync_redis.ConnectionError, match="stayed busy") as caught:
            await client.ping()
        assert loop.time() - started >= 0.5
        response = response_for(caught.value)
        assert response is not None and response.status_code == 503
        await pool.release(held)
    finally:
        await client.aclose(close_connection_pool=True)
