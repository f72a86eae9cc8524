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
import redis as sync_redis
from redis.asyncio import Redis

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
