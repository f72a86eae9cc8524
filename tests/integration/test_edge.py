"""The edge tier through a real Varnish running deploy/varnish/default.vcl (xkey vmod),
in front of real ``wbcache serve`` and ``wbcache worker`` processes: shared reads are
answered by the edge, every write and invalidation is visible through it within 1 s, 404s
do not hide creates, private collections are never stored, and purges outlive an edge
outage and an API crash (docs/edge.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.core.purge import record_member
from service.core.shards import Shards
from service.dev.varnish import Varnish, edge_for_api, varnishd
from tests.conftest import wait_until
from tests.support import servers as test_servers
from tests.support.procs import ApiProc, WorkerProc, service_env
from worker.purge import Purger


@pytest.fixture(autouse=True, scope="module")
def _varnishd_installed() -> None:
    """Missing varnishd fails these tests (scripts/ensure-test-packages.sh installs it):
    a skipped edge test would prove nothing."""
    if varnishd() is None:
        pytest.fail("varnishd is not installed: run scripts/ensure-test-packages.sh")


RECORD_ROUTE = "/v1/{collection}/{key:anything}"
# The bound: after a write is acknowledged, a read through a healthy edge shows it
# within this many seconds.
BOUND_S = 1.0


@dataclass
class Edge:
    """A Varnish in front of an API process; the worker (which purges) on demand."""

    varnish: Varnish
    api_proc: ApiProc
    env: dict[str, str]
    tmp: Path
    api: httpx.AsyncClient
    edge: httpx.AsyncClient
    public: str  # s-maxage 300, 404s not stored
    public_404: str  # 404s kept 300 s at the edge (purged on create)
    short: str  # s-maxage 1: expires quickly, then revalidated
    fallback: str  # s-maxage 1, stale-if-error 600
    private: str  # max-age 60, private
    workers: list[WorkerProc] = field(default_factory=list)

    async def start_worker(self) -> WorkerProc:
        """A worker, once its heartbeat shows (it purges from then on)."""
        w = WorkerProc(self.env, self.tmp / f"worker-{len(self.workers)}.log")
        self.workers.append(w)
        w.start()
        live = len(self.workers)

        async def up() -> bool:
            return bool((await self.stats())["workers"] >= live)

        await wait_until(up, timeout=30)
        return w

    def restart_api(self, kill: bool = False) -> None:
        if kill:
            self.api_proc.kill()
        else:
            self.api_proc.stop()
        self.api_proc = ApiProc(self.env, self.tmp / "api-again.log", port=self.api_proc.port)
        self.api_proc.start()

    async def record_requests(self, status: int) -> float:
        """GETs of records the API answered with ``status`` (its /metrics)."""
        text = (await self.api.get("/metrics")).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if (
                    s.name == "wbcache_http_request_duration_seconds_count"
                    and s.labels.get("route") == RECORD_ROUTE
                    and s.labels.get("method") == "GET"
                    and s.labels.get("status") == str(status)
                ):
                    total += s.value
        return total

    async def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = (await self.api.get("/v1/stats")).json()
        return s

    async def visible(self, path: str, check: Callable[[httpx.Response], bool]) -> float:
        """Seconds until a read of ``path`` through the edge passes ``check`` (polled)."""
        started = time.monotonic()

        async def seen() -> bool:
            return check(await self.edge.get(path))

        await wait_until(seen, timeout=10, interval=0.01)
        return time.monotonic() - started


@pytest.fixture
async def stack(
    servers: test_servers.TestServers,
    prefix: str,
    tmp_path: Path,
    pg: asyncpg.Connection,
    redis: Any,
) -> AsyncIterator[Edge]:
    tag = uuid.uuid4().hex[:8]
    public, public_404, short, fallback, private = (
        f"{n}{tag}" for n in ("pub", "neg", "short", "sie", "priv")
    )
    policy = {
        public: {
            "public": True,
            "max_age": 0,
            "s_maxage": 300,
            "stale_while_revalidate": 30,
            "stale_if_error": 600,
        },
        public_404: {"public": True, "s_maxage": 300, "not_found_s_maxage": 300},
        short: {"public": True, "s_maxage": 1},
        fallback: {"public": True, "s_maxage": 1, "stale_if_error": 600},
        private: {"max_age": 60},
    }
    api_port, varnish = edge_for_api(tmp_path / "varnish")
    env = service_env(
        servers.redis_url,
        servers.database_url,
        prefix,
        WRITE_DELAY_MS="50",
        SWEEP_SECONDS="1",
        LEASE_SECONDS="3",
        COLLECTION_CACHE=orjson.dumps(policy).decode(),
        EDGE_PURGE_URLS=varnish.url,
        EDGE_PURGE_BACKOFF_MAX_SECONDS="0.5",
        EDGE_PURGE_TIMEOUT_SECONDS="1",
    )
    if servers.shards is not None:
        env["REDIS_SHARDS"] = str(servers.shards)
    if servers.arq_redis_url:
        env["ARQ_REDIS_URL"] = servers.arq_redis_url
    api_proc = ApiProc(env, tmp_path / "api.log", port=api_port).start()
    async with (
        httpx.AsyncClient(base_url=api_proc.url, timeout=10) as api,
        httpx.AsyncClient(base_url=varnish.url, timeout=10) as edge,
    ):
        s = Edge(
            varnish,
            api_proc,
            env,
            tmp_path,
            api,
            edge,
            public,
            public_404,
            short,
            fallback,
            private,
        )
        # The edge's health probe must see the API before stale-if-error logic applies.
        await wait_until(lambda: _probe(edge), timeout=10)
        try:
            yield s
        finally:
            for w in s.workers:
                w.stop()
            s.api_proc.stop()
            varnish.stop()


async def _probe(edge: httpx.AsyncClient) -> bool:
    return (await edge.get("/healthz")).status_code == 200


def version_of(r: httpx.Response) -> int:
    return int(r.headers["etag"].strip('"'))


def edge_status(r: httpx.Response) -> str:
    """This Varnish's entry of Cache-Status (RFC 9211)."""
    entries = [e.strip() for e in r.headers["cache-status"].split(",")]
    mine = [e for e in entries if e.startswith("varnish")]
    assert len(mine) == 1, r.headers["cache-status"]
    return mine[0]


async def test_shared_reads_are_answered_by_the_edge(stack: Edge) -> None:
    await stack.start_worker()
    path = f"/v1/{stack.public}/k"
    put = await stack.api.put(path, json={"a": 1})
    assert put.status_code == 201
    direct = await stack.api.get(path)
    assert direct.headers["cache-control"] == (
        "public, max-age=0, s-maxage=300, stale-while-revalidate=30, stale-if-error=600"
    )
    assert direct.headers["surrogate-key"] == f"c/{stack.public} r/{stack.public}/k"
    assert direct.headers["cache-status"] == "wbcache; hit"
    await wait_until(lambda: _no_purges_pending(stack), timeout=10)  # the PUT's own purges
    before = await stack.record_requests(200)
    answers = [await stack.edge.get(path) for _ in range(20)]
    assert all(r.status_code == 200 and r.json() == {"a": 1} for r in answers)
    assert await stack.record_requests(200) - before == 1  # one fetch for twenty reads
    assert edge_status(answers[0]).startswith("varnish; fwd=miss")
    assert all(edge_status(r).startswith("varnish; hit") for r in answers[1:])
    # The API's own entry comes first, from the fetch that filled the edge.
    assert answers[-1].headers["cache-status"].startswith("wbcache; ")
    assert "xkey" not in answers[-1].headers


@pytest.mark.parametrize("op", ["put", "patch", "delete"])
async def test_a_write_is_visible_through_the_edge_within_the_bound(stack: Edge, op: str) -> None:
    await stack.start_worker()
    path = f"/v1/{stack.public}/{op}-k%2Fslash"
    await stack.api.put(path, json={"v": 1})
    await wait_until(lambda: _no_purges_pending(stack), timeout=10)  # the PUT's own purges
    old = await stack.edge.get(path)
    assert old.status_code == 200
    assert edge_status(await stack.edge.get(path)).startswith("varnish; hit")
    if op == "put":
        ack = await stack.api.put(path, json={"v": 2})
    elif op == "patch":
        ack = await stack.api.patch(
            path, content=b'{"w": 3}', headers={"Content-Type": "application/merge-patch+json"}
        )
    else:
        ack = await stack.api.delete(path)
    assert ack.status_code in (200, 204)
    new_version = version_of(ack)

    def current(r: httpx.Response) -> bool:
        if op == "delete":
            return r.status_code == 404
        return r.status_code == 200 and version_of(r) == new_version

    assert await stack.visible(path, current) < BOUND_S


async def test_invalidating_a_key_and_a_collection_reaches_the_edge(
    stack: Edge, pg: asyncpg.Connection
) -> None:
    await stack.start_worker()
    paths = [f"/v1/{stack.public}/inv{i}" for i in range(3)]
    for p in paths:
        await stack.api.put(p, json={"by": "api"})
    await wait_until(lambda: _drained(stack), timeout=20)
    for p in paths:
        assert (await stack.edge.get(p)).json() == {"by": "api"}

    async def change_in_postgres(key: str) -> None:
        """What another program does: a newer row, behind the cache's back."""
        await pg.execute(
            'UPDATE records SET value = \'{"by": "sql"}\', version = version + 1 '
            "WHERE collection = $1 AND key = $2",
            stack.public,
            key,
        )

    await change_in_postgres("inv0")
    r = await stack.api.post("/v1/invalidate", json={"collection": stack.public, "keys": ["inv0"]})
    assert r.status_code == 200
    assert await stack.visible(paths[0], lambda r: r.json() == {"by": "sql"}) < BOUND_S
    assert (await stack.edge.get(paths[1])).json() == {"by": "api"}  # only that key

    for key in ("inv1", "inv2"):
        await change_in_postgres(key)
    r = await stack.api.post("/v1/invalidate", json={"collection": stack.public})
    assert r.status_code == 200
    for p in paths[1:]:
        assert await stack.visible(p, lambda r: r.json() == {"by": "sql"}) < BOUND_S


async def _drained(stack: Edge) -> bool:
    s = await stack.stats()
    return bool(s["pending"] == 0)


async def test_a_404_does_not_hide_a_create(stack: Edge) -> None:
    await stack.start_worker()
    # By default a 404 is no-store: the edge asks the API every time.
    path = f"/v1/{stack.public}/later"
    first = await stack.edge.get(path)
    assert first.status_code == 404 and first.headers["cache-control"] == "no-store"
    assert (await stack.edge.get(path)).status_code == 404
    await stack.api.put(path, json={"now": True})
    assert await stack.visible(path, lambda r: r.status_code == 200) < BOUND_S

    # A collection that lets the edge keep 404s: the create's purge drops the 404.
    path = f"/v1/{stack.public_404}/later"
    assert (await stack.edge.get(path)).status_code == 404
    cached = await stack.edge.get(path)
    assert cached.status_code == 404 and edge_status(cached).startswith("varnish; hit")
    assert cached.headers["cache-control"] == "public, max-age=0, s-maxage=300"
    await stack.api.put(path, json={"now": True})
    assert await stack.visible(path, lambda r: r.status_code == 200) < BOUND_S


async def test_private_collections_are_never_stored_by_the_edge(stack: Edge) -> None:
    path = f"/v1/{stack.private}/k"
    await stack.api.put(path, json={"secret": 1})
    before = await stack.record_requests(200)
    answers = [await stack.edge.get(path) for _ in range(5)]
    assert all(r.headers["cache-control"] == "private, max-age=60" for r in answers)
    assert not any(edge_status(r).startswith("varnish; hit") for r in answers)
    assert await stack.record_requests(200) - before == 5  # every read reached the API
    # Default collections (private, no-cache) too, and writes always pass.
    other = f"/v1/plain{uuid.uuid4().hex[:8]}/k"
    assert (await stack.edge.put(other, json=1)).status_code == 201
    before = await stack.record_requests(200)
    for _ in range(3):
        assert (await stack.edge.get(other)).headers["cache-control"] == "private, no-cache"
    assert await stack.record_requests(200) - before == 3


async def test_expired_copies_are_revalidated_with_if_none_match(stack: Edge) -> None:
    path = f"/v1/{stack.short}/k"
    await stack.api.put(path, json={"a": 1})
    assert (await stack.edge.get(path)).status_code == 200
    before = await stack.record_requests(304)

    async def revalidated() -> bool:
        r = await stack.edge.get(path)
        assert r.status_code == 200 and r.json() == {"a": 1}
        return await stack.record_requests(304) > before

    await wait_until(revalidated, timeout=10, interval=0.2)


async def test_writes_succeed_while_the_edge_is_down_and_purges_follow(stack: Edge) -> None:
    await stack.start_worker()
    path = f"/v1/{stack.public}/down"
    await stack.api.put(path, json={"v": 1})
    assert (await stack.edge.get(path)).json() == {"v": 1}
    await wait_until(lambda: _no_purges_pending(stack), timeout=10)
    stack.varnish.stop()
    failures0 = (await stack.stats())["edge_purge_failures"]
    for i in range(5):
        assert (await stack.api.put(path, json={"v": 2 + i})).status_code == 200

    async def retrying() -> bool:
        s = await stack.stats()
        return bool(s["edge_purge_failures"] > failures0 + 1 and s["edge_purges_pending"] >= 1)

    await wait_until(retrying, timeout=10)
    purged0 = (await stack.stats())["edge_purges"]
    stack.varnish.start()  # same port, empty cache
    await wait_until(lambda: _no_purges_pending(stack), timeout=15)
    assert (await stack.stats())["edge_purges"] > purged0
    assert (await stack.edge.get(path)).json() == {"v": 6}
    metrics = (await stack.api.get("/metrics")).text
    assert "wbcache_edge_purge_failures_total" in metrics
    assert "wbcache_edge_purge_latency_seconds_bucket" in metrics


async def _no_purges_pending(stack: Edge) -> bool:
    return bool((await stack.stats())["edge_purges_pending"] == 0)


async def test_a_purge_outlives_an_api_crash_after_the_acknowledgement(stack: Edge) -> None:
    # No worker yet: nothing drains the purge queue.
    path = f"/v1/{stack.public}/crash"
    await stack.api.put(path, json={"v": 1})
    assert (await stack.edge.get(path)).json() == {"v": 1}
    ack = await stack.api.put(path, json={"v": 2})
    assert ack.status_code == 200
    stack.restart_api(kill=True)  # SIGKILL right after the acknowledgement
    assert (await stack.edge.get(path)).json() == {"v": 1}  # still the edge's copy
    started = time.monotonic()
    await stack.start_worker()
    await stack.visible(path, lambda r: r.status_code == 200 and r.json() == {"v": 2})
    assert time.monotonic() - started < 30


async def test_batch_writes_are_purged_too(stack: Edge) -> None:
    await stack.start_worker()
    paths = [f"/v1/{stack.public}/b{i}" for i in range(3)]
    for p in paths:
        await stack.api.put(p, json={"v": 1})
    await wait_until(lambda: _no_purges_pending(stack), timeout=10)
    for p in paths:
        assert (await stack.edge.get(p)).json() == {"v": 1}
        assert edge_status(await stack.edge.get(p)).startswith("varnish; hit")
    ops = [
        {"op": "put", "collection": stack.public, "key": "b0", "document": {"v": 2}},
        {"op": "patch", "collection": stack.public, "key": "b1", "patch": {"w": 2}},
        {"op": "delete", "collection": stack.public, "key": "b2"},
    ]
    r = await stack.edge.post("/v1/batch", json={"operations": ops})  # passed through
    assert r.status_code == 200, r.text
    assert await stack.visible(paths[0], lambda r: r.json() == {"v": 2}) < BOUND_S
    assert await stack.visible(paths[1], lambda r: r.json() == {"v": 1, "w": 2}) < BOUND_S
    assert await stack.visible(paths[2], lambda r: r.status_code == 404) < BOUND_S


async def test_everything_but_record_reads_passes_through(stack: Edge) -> None:
    for path in ("/v1/stats", "/metrics", "/readyz", f"/v1/{stack.public}?limit=5"):
        first = await stack.edge.get(path)
        second = await stack.edge.get(path)
        for r in (first, second):
            assert r.status_code < 500, (path, r.text)
            assert edge_status(r) == "varnish; fwd=bypass", path


async def test_purges_are_accepted_only_from_the_purgers_network(stack: Edge) -> None:
    path = f"/v1/{stack.public}/acl"
    await stack.api.put(path, json={"v": 1})
    await stack.edge.get(path)
    key = f"r/{stack.public}/acl"
    # 127.0.0.2 is a loopback address the VCL's ACL does not list.
    outsider = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(transport=outsider, base_url=stack.varnish.url) as other:
        refused = await other.request("PURGE", "/", headers={"xkey-purge": key})
    assert refused.status_code == 403
    assert edge_status(await stack.edge.get(path)).startswith("varnish; hit")
    allowed = await stack.edge.request("PURGE", "/", headers={"xkey-purge": key})
    assert allowed.status_code == 200 and "Purged 1 objects" in allowed.text
    assert edge_status(await stack.edge.get(path)).startswith("varnish; fwd=miss")


async def test_stale_if_error_serves_the_old_copy_while_the_api_is_down(stack: Edge) -> None:
    path = f"/v1/{stack.fallback}/k"
    await stack.api.put(path, json={"v": 1})
    assert (await stack.edge.get(path)).status_code == 200
    stack.api_proc.stop()
    # Past its 1 s TTL, before and after the edge's probe notices the API is gone, every
    # read is answered from the old copy: never a 503.
    await wait_until(lambda: _expired_and_served(stack, path), timeout=10, interval=0.1)


async def _expired_and_served(stack: Edge, path: str) -> bool:
    r = await stack.edge.get(path)
    assert r.status_code == 200 and r.json() == {"v": 1}, r.text
    ttl = edge_status(r).partition("ttl=")[2]
    return bool(ttl) and float(ttl) < -1  # served more than 1 s past its TTL


async def test_a_second_purge_drops_a_copy_fetched_while_the_first_landed(
    settings_factory: Callable[..., Settings], redis: Any, tmp_path: Path
) -> None:
    """The purge race (DESIGN.md): an edge fetch in flight when the purge lands stores the
    old version after it. A slow origin answers the first fetch (the old version) late;
    the purge arrives meanwhile; the second purge, EDGE_PURGE_ECHO_MS later, drops it."""
    answered: list[bytes] = []

    async def origin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        body = b'{"ok":true}'
        if not head.startswith(b"GET /healthz"):
            old = not answered
            body = b'{"v":1}' if old else b'{"v":2}'
            answered.append(body)
            if old:
                await asyncio.sleep(0.6)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Cache-Control: public, max-age=0, s-maxage=300\r\n"
            b"Surrogate-Key: c/pub r/pub/k\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    varnish = Varnish(tmp_path / "varnish", port).start()
    settings = settings_factory(
        edge_purge_urls=varnish.url,
        edge_purge_echo_ms=1000,
        collection_cache={"pub": {"public": True, "s_maxage": 300}},
    )
    purger = Purger(redis, settings)
    task = asyncio.create_task(purger.run())
    try:
        async with httpx.AsyncClient(base_url=varnish.url, timeout=10) as edge:
            fetch = asyncio.create_task(edge.get("/v1/pub/k"))
            await wait_until(lambda: answered, timeout=5)  # the fetch is at the origin
            await purger.queue.add([record_member("pub", "k")])
            purges = Shards.from_settings(settings).any.purge_queue

            async def first_purge_done() -> bool:
                return bool(await redis.zscore(purges, record_member("pub", "k")) is None)

            await wait_until(first_purge_done, timeout=5)
            assert (await fetch).json() == {"v": 1}
            # The race: the old version was stored after the first purge.
            stale = await edge.get("/v1/pub/k")
            assert stale.json() == {"v": 1} and edge_status(stale).startswith("varnish; hit")
            started = time.monotonic()

            async def fresh() -> bool:
                return bool((await edge.get("/v1/pub/k")).json() == {"v": 2})

            await wait_until(fresh, timeout=5, interval=0.01)
            assert time.monotonic() - started < 1.0 + BOUND_S
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        varnish.stop()
        server.close()
