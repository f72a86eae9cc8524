"""Cache-aside fills racing writes, deletes and invalidations, and miss storms.

The Postgres read of a fill is delayed deterministically: ``service.repository.fetch`` is
wrapped so that its first call waits for an ``asyncio.Event`` (before or after running the
real query against Postgres). Nothing is mocked: the query, Redis and the scripts are real;
only the moment the fill proceeds is chosen by the test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from arq.worker import Worker

from service.config import Settings
from service.core import repository
from service.core.redis_keys import Keys
from tests.conftest import running_worker, wait_drained, wait_until

COLLECTION = "race"
OLD_VERSION = 1000
OLD_DOC = {"state": "old", "list": [], "obj": {}}
NEW_DOC = {"state": "new", "n": [1, 2, 3]}

Fetch = Callable[[Any, str, str], Awaitable[repository.StoredRow]]


class GatedFetch:
    """``repository.fetch`` that counts its calls and holds the first ``gated`` of them at
    an event: ``before`` the real query runs, or ``after`` it has read Postgres."""

    def __init__(self, real: Fetch, when: str, gated: int = 1) -> None:
        assert when in ("before", "after")
        self.real = real
        self.when = when
        self.gated = gated
        self.calls = 0
        self.held = asyncio.Event()  # a gated call is waiting now
        self.release = asyncio.Event()

    async def __call__(self, pool: Any, collection: str, key: str) -> repository.StoredRow:
        self.calls += 1
        gate = self.calls <= self.gated
        if gate and self.when == "before":
            await self._wait()
        row = await self.real(pool, collection, key)
        if gate and self.when == "after":
            await self._wait()
        return row

    async def _wait(self) -> None:
        self.held.set()
        await asyncio.wait_for(self.release.wait(), timeout=30)


@pytest.fixture
def gated_fetch(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], GatedFetch]:
    def install(when: str) -> GatedFetch:
        gate = GatedFetch(repository.fetch, when)
        monkeypatch.setattr(repository, "fetch", gate)
        return gate

    return install


async def _insert_old_row(pg: asyncpg.Connection, key: str) -> None:
    """A row Postgres holds but Redis does not (written by another program, or evicted)."""
    await pg.execute(
        "INSERT INTO records (collection, key, value, version, updated_at) "
        "VALUES ($1, $2, $3::jsonb, $4, now())",
        COLLECTION,
        key,
        orjson.dumps(OLD_DOC).decode(),
        OLD_VERSION,
    )


def _version(r: httpx.Response) -> int:
    return int(r.headers["etag"].strip('"'))


async def _quiesce(worker: Worker) -> None:
    """Stop ``worker`` taking jobs and end its running ones. Works around running_worker's
    teardown: arq's ``Worker.close()`` cancels running jobs and then re-raises their
    CancelledError from ``asyncio.gather`` (a flaky failure when a sweep is running)."""
    worker.allow_pick_jobs = False
    tasks = list(worker.tasks.values())
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    worker.tasks.clear()


@contextlib.asynccontextmanager
async def _watch_entry(redis: Any, entry: str) -> AsyncIterator[list[tuple[Any, Any, Any]]]:
    """Every distinct state of a cache entry seen while the block runs (polled each ms)."""
    states: list[tuple[Any, Any, Any]] = []
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            state = tuple(await redis.hmget(entry, ["v", "d", "t"]))
            if not states or states[-1] != state:
                states.append(state)
            await asyncio.sleep(0.001)

    task = asyncio.create_task(watch())
    try:
        yield states
    finally:
        stop.set()
        await task


@pytest.mark.parametrize("gate", ["before", "after"])
@pytest.mark.parametrize(
    ("committed", "invalidated"),
    [(False, False), (True, False), (True, True)],
    ids=["pending", "committed", "committed+invalidated"],
)
@pytest.mark.parametrize("op", ["put", "delete"])
async def test_a_fill_racing_a_write_never_installs_the_older_row(
    api: httpx.AsyncClient,
    settings: Settings,
    redis: Any,
    pg: asyncpg.Connection,
    gated_fetch: Callable[[str], GatedFetch],
    op: str,
    gate: str,
    committed: bool,
    invalidated: bool,
) -> None:
    key = f"{op}-{gate}-{committed}-{invalidated}"
    entry = Keys(settings.redis_prefix).entry(COLLECTION, key)
    await _insert_old_row(pg, key)
    fetch = gated_fetch(gate)

    # A GET misses and starts a fill; its Postgres read is held (before or after reading
    # the old row).
    racing_get = asyncio.create_task(api.get(f"/v1/{COLLECTION}/{key}"))
    await asyncio.wait_for(fetch.held.wait(), timeout=10)

    # Meanwhile the newer write is accepted (its own Postgres read is not held) ...
    if op == "put":
        w = await api.put(f"/v1/{COLLECTION}/{key}", json=NEW_DOC)
        assert w.status_code == 200, w.text  # replaced: the old row exists
    else:
        w = await api.delete(f"/v1/{COLLECTION}/{key}")
        assert w.status_code == 204, w.text
    new_version = _version(w)
    assert new_version > OLD_VERSION
    assert fetch.calls == 2  # the write read Postgres for its version floor

    # ... optionally committed by a worker, and the cached entry invalidated.
    if committed:
        async with running_worker(settings) as worker:
            await wait_drained(api)
            await _quiesce(worker)
        row = await pg.fetchrow(
            "SELECT version, value FROM records WHERE collection = $1 AND key = $2",
            COLLECTION,
            key,
        )
        if op == "put":
            assert row is not None and row["version"] == new_version
        else:
            assert row is None
    if invalidated:
        r = await api.post("/v1/invalidate", json={"collection": COLLECTION, "keys": [key]})
        assert r.json() == {"invalidated": 1, "skipped_pending": 0}
        assert await redis.exists(entry) == 0

    # Let the fill go on, with what it read.
    async with _watch_entry(redis, entry) as states:
        fetch.release.set()
        first = await asyncio.wait_for(racing_get, timeout=30)
        after = await api.get(f"/v1/{COLLECTION}/{key}")
        again = await api.get(f"/v1/{COLLECTION}/{key}")

    # The racing GET started before the write: it may answer either state, consistently.
    if first.status_code == 200 and _version(first) == OLD_VERSION:
        assert first.json() == OLD_DOC
    elif op == "put":
        assert first.status_code == 200 and _version(first) == new_version, first.text
        assert first.json() == NEW_DOC
    else:
        assert first.status_code == 404, first.text

    # Every later read sees the newer state, and Redis never held the old row.
    for r in (after, again):
        if op == "put":
            assert r.status_code == 200 and _version(r) == new_version, r.text
            assert r.json() == NEW_DOC
        else:
            assert r.status_code == 404, r.text
    assert again.headers["x-cache"] == "hit"
    for v, d, t in states:
        assert v is None or int(v) >= new_version, f"the old row was installed: {states}"
        assert d is None or orjson.loads(d) == NEW_DOC, states
        if op == "delete":
            assert v is None or (t == b"1" and d is None), states
    v, d, t = await redis.hmget(entry, ["v", "d", "t"])
    assert int(v) == new_version
    if op == "put":
        assert orjson.loads(d) == NEW_DOC and t is None
    else:
        assert d is None and t == b"1"


@pytest.mark.parametrize("present", [True, False], ids=["row", "absent"])
async def test_a_miss_storm_makes_one_postgres_read(
    api: httpx.AsyncClient,
    pg: asyncpg.Connection,
    gated_fetch: Callable[[str], GatedFetch],
    present: bool,
) -> None:
    key = f"hot-{present}"
    if present:
        await _insert_old_row(pg, key)
    fetch = gated_fetch("before")
    gets = [asyncio.create_task(api.get(f"/v1/{COLLECTION}/{key}")) for _ in range(50)]
    await asyncio.wait_for(fetch.held.wait(), timeout=10)

    # All 50 have missed the cache (and so wait for the one fill) before it reads Postgres.
    async def all_missed() -> bool:
        stats = (await api.get("/v1/stats")).json()
        return bool(stats["misses"] >= 50)

    await wait_until(all_missed, timeout=20)
    fetch.release.set()
    answers = await asyncio.wait_for(asyncio.gather(*gets), timeout=30)

    assert fetch.calls == 1
    assert {r.status_code for r in answers} == {200 if present else 404}
    assert len({r.content for r in answers}) == 1
    assert {r.headers["x-cache"] for r in answers} == {"miss"}
    if present:
        assert answers[0].json() == OLD_DOC
        assert {r.headers["etag"] for r in answers} == {f'"{OLD_VERSION}"'}
    hit = await api.get(f"/v1/{COLLECTION}/{key}")
    assert hit.headers["x-cache"] == "hit" and hit.content == answers[0].content
    assert fetch.calls == 1
