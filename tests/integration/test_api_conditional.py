"""Conditional requests (RFC 9110 §13) as CONTRACT.md words them, each case both with the
entry cached in Redis and with it evicted (so Postgres supplies existence and version),
and preconditions checked atomically with the write under concurrency."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from arq.worker import Worker

from service.config import Settings
from tests.conftest import running_api, wait_drained
from tests.integration.test_api_records import entry_key

if TYPE_CHECKING:  # a class named Test* must not be collected as a test class
    from tests.support.servers import TestServers


MERGE = {"Content-Type": "application/merge-patch+json"}
CACHED = pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])


@pytest.fixture
async def pg(servers: TestServers) -> AsyncIterator[asyncpg.Connection]:
    """conftest's ``pg`` without its TRUNCATE (slow under load): every test here writes only
    to collections of its own, so nothing another test left in Postgres can meet it."""
    conn = await asyncpg.connect(servers.database_url)
    yield conn
    await conn.close()


class Harness:
    """The API, and a way to push a key out of Redis once everything is persisted."""

    def __init__(self, api: httpx.AsyncClient, redis: Any, settings: Settings, cached: bool):
        self.api = api
        self.redis = redis
        self.settings = settings
        self.cached = cached
        # A collection of this test alone: Postgres is shared by every test of the session.
        self.c = f"t{uuid.uuid4().hex[:12]}"

    def p(self, key: str) -> str:
        return f"/v1/{self.c}/{key}"

    async def prepare(self, path: str) -> None:
        """Before a conditional request: in the uncached variant, let the worker persist
        everything and drop the key's entry (a live value, a tombstone or a negative fill)."""
        if self.cached:
            return
        await wait_drained(self.api)
        _, collection, key = path.strip("/").split("/")[-3:]
        await self.redis.delete(entry_key(self.settings, collection, key))

    async def etag(self, path: str) -> str:
        r = await self.api.get(path)
        assert r.status_code == 200, r.text
        tag: str = r.headers["etag"]
        return tag


@pytest.fixture
def h(
    api: httpx.AsyncClient, worker: Worker, redis: Any, settings: Settings, cached: bool
) -> Harness:
    return Harness(api, redis, settings, cached)


def assert_error(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def weak(tag: str) -> str:
    return f"W/{tag}"


# -- If-None-Match on GET / HEAD --------------------------------------------------------------


@CACHED
async def test_if_none_match_on_get_and_head_answers_304(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"a": 1})
    tag = await h.etag(h.p("k"))
    for value in [tag, f'"1", {tag}', f'"1",{tag} , "2"', "*", weak(tag), f'W/"1", {weak(tag)}']:
        for method in ("GET", "HEAD"):
            await h.prepare(h.p("k"))
            r = await h.api.request(method, h.p("k"), headers={"If-None-Match": value})
            assert r.status_code == 304, (value, method, r.status_code)
            assert r.headers["etag"] == tag
            assert r.headers["cache-control"] == "private, no-cache"
            assert r.content == b""
    for value in ['"1"', 'W/"1"', '"1", W/"2"', '"abc"']:
        await h.prepare(h.p("k"))
        r = await h.api.get(h.p("k"), headers={"If-None-Match": value})
        assert r.status_code == 200, value
        assert r.json() == {"a": 1}
        assert r.headers["etag"] == tag


@CACHED
async def test_if_none_match_on_absent_or_deleted_key_is_404(h: Harness) -> None:
    await h.prepare(h.p("absent"))
    assert_error(await h.api.get(h.p("absent"), headers={"If-None-Match": "*"}), 404)
    await h.api.put(h.p("k"), json=1)
    await h.api.delete(h.p("k"))
    await h.prepare(h.p("k"))
    assert_error(await h.api.get(h.p("k"), headers={"If-None-Match": "*"}), 404)


async def test_304_carries_the_collection_max_age(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    products = f"t{uuid.uuid4().hex[:12]}"
    async with running_api(settings_factory(collection_max_age={products: 30})) as api:
        r = await api.put(f"/v1/{products}/p", json={"a": 1})
        tag = r.headers["etag"]
        r = await api.get(f"/v1/{products}/p", headers={"If-None-Match": tag})
        assert r.status_code == 304
        assert r.headers["etag"] == tag
        assert r.headers["cache-control"] == "private, max-age=30"


# -- If-Match on PUT / PATCH / DELETE ---------------------------------------------------------


@CACHED
async def test_if_match_on_put(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"v": 0})
    tag = await h.etag(h.p("k"))
    for value in ['"1"', weak(tag), f'W/"1", {weak(tag)}', '"abc"']:
        await h.prepare(h.p("k"))
        r = await h.api.put(h.p("k"), json={"v": "no"}, headers={"If-Match": value})
        assert_error(r, 412)
        assert await h.etag(h.p("k")) == tag  # nothing changed
    for i, form in enumerate(["{tag}", '"1", {tag}', "*"]):
        current = await h.etag(h.p("k"))
        await h.prepare(h.p("k"))
        r = await h.api.put(h.p("k"), json={"v": i}, headers={"If-Match": form.format(tag=current)})
        assert r.status_code == 200, (form, r.text)
        assert r.headers["etag"] != current
        assert (await h.api.get(h.p("k"))).json() == {"v": i}


@CACHED
async def test_if_match_on_patch(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"v": 0})
    tag = await h.etag(h.p("k"))
    for value in ['"1"', weak(tag), '"1", "2"']:
        await h.prepare(h.p("k"))
        r = await h.api.patch(h.p("k"), content=b'{"x":1}', headers={**MERGE, "If-Match": value})
        assert_error(r, 412)
        assert await h.etag(h.p("k")) == tag
    for i, form in enumerate(["{tag}", '"1", {tag}', "*"]):
        current = await h.etag(h.p("k"))
        await h.prepare(h.p("k"))
        r = await h.api.patch(
            h.p("k"),
            content=f'{{"v": {i}}}'.encode(),
            headers={**MERGE, "If-Match": form.format(tag=current)},
        )
        assert r.status_code == 200, (form, r.text)
        assert r.json() == {"v": i}
        assert r.headers["etag"] != current


@CACHED
async def test_if_match_on_delete(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"v": 0})
    tag = await h.etag(h.p("k"))
    for value in ['"1"', weak(tag), '"1", "2"']:
        await h.prepare(h.p("k"))
        assert_error(await h.api.delete(h.p("k"), headers={"If-Match": value}), 412)
        assert await h.etag(h.p("k")) == tag
    await h.prepare(h.p("k"))
    r = await h.api.delete(h.p("k"), headers={"If-Match": f'"1", {tag}'})
    assert r.status_code == 204
    assert (await h.api.get(h.p("k"))).status_code == 404

    await h.api.put(h.p("k2"), json=1)
    await h.prepare(h.p("k2"))
    assert (await h.api.delete(h.p("k2"), headers={"If-Match": "*"})).status_code == 204
    assert (await h.api.get(h.p("k2"))).status_code == 404


@CACHED
async def test_patch_and_delete_of_absent_key_are_404_whatever_the_preconditions(
    h: Harness,
) -> None:
    await h.api.put(h.p("deleted"), json=1)
    deleted_tag = await h.etag(h.p("deleted"))
    await h.api.delete(h.p("deleted"))
    conditions = [
        {"If-Match": '"1"'},
        {"If-Match": "*"},
        {"If-Match": deleted_tag},
        {"If-None-Match": "*"},
        {"If-None-Match": '"1"'},
    ]
    for path in (h.p("absent"), h.p("deleted")):
        for cond in conditions:
            await h.prepare(path)
            r = await h.api.patch(path, content=b'{"a":1}', headers={**MERGE, **cond})
            assert_error(r, 404)
            await h.prepare(path)
            assert_error(await h.api.delete(path, headers=cond), 404)
        assert (await h.api.get(path)).status_code == 404


@CACHED
async def test_put_with_if_match_on_absent_key_is_412(h: Harness) -> None:
    await h.api.put(h.p("deleted"), json=1)
    deleted_tag = await h.etag(h.p("deleted"))
    await h.api.delete(h.p("deleted"))
    for path in (h.p("absent"), h.p("deleted")):
        for value in ['"1"', "*", deleted_tag]:
            await h.prepare(path)
            assert_error(await h.api.put(path, json=1, headers={"If-Match": value}), 412)
        assert (await h.api.get(path)).status_code == 404


@CACHED
async def test_put_with_if_none_match(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"v": 0})
    tag = await h.etag(h.p("k"))
    for value in ["*", tag, f'"1", {tag}', weak(tag)]:
        await h.prepare(h.p("k"))
        assert_error(await h.api.put(h.p("k"), json=1, headers={"If-None-Match": value}), 412)
        assert await h.etag(h.p("k")) == tag

    await h.prepare(h.p("k"))
    r = await h.api.put(h.p("k"), json={"v": 1}, headers={"If-None-Match": '"1"'})
    assert r.status_code == 200

    await h.prepare(h.p("new"))
    r = await h.api.put(h.p("new"), json={"v": 1}, headers={"If-None-Match": "*"})
    assert r.status_code == 201
    assert (await h.api.get(h.p("new"))).json() == {"v": 1}

    await h.api.put(h.p("gone"), json=1)
    await h.api.delete(h.p("gone"))
    await h.prepare(h.p("gone"))
    r = await h.api.put(h.p("gone"), json={"v": 2}, headers={"If-None-Match": "*"})
    assert r.status_code == 201


# -- atomicity --------------------------------------------------------------------------------


@CACHED
async def test_concurrent_puts_with_one_etag_exactly_one_wins(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"v": -1})
    tag = await h.etag(h.p("k"))
    await h.prepare(h.p("k"))
    rs = await asyncio.gather(
        *(h.api.put(h.p("k"), json={"v": i}, headers={"If-Match": tag}) for i in range(16))
    )
    codes = Counter(r.status_code for r in rs)
    assert codes == {200: 1, 412: 15}, codes
    winner = next(i for i, r in enumerate(rs) if r.status_code == 200)
    got = await h.api.get(h.p("k"))
    assert got.json() == {"v": winner}
    assert got.headers["etag"] == rs[winner].headers["etag"]


@CACHED
async def test_concurrent_patches_with_one_etag_exactly_one_wins(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"base": 1})
    tag = await h.etag(h.p("k"))
    await h.prepare(h.p("k"))
    rs = await asyncio.gather(
        *(
            h.api.patch(
                h.p("k"), content=f'{{"f{i}": {i}}}'.encode(), headers={**MERGE, "If-Match": tag}
            )
            for i in range(16)
        )
    )
    codes = Counter(r.status_code for r in rs)
    assert codes == {200: 1, 412: 15}, codes
    winner = next(i for i, r in enumerate(rs) if r.status_code == 200)
    assert (await h.api.get(h.p("k"))).json() == {"base": 1, f"f{winner}": winner}


@CACHED
async def test_concurrent_deletes_with_one_etag_exactly_one_wins(h: Harness) -> None:
    await h.api.put(h.p("k"), json={"v": 1})
    tag = await h.etag(h.p("k"))
    await h.prepare(h.p("k"))
    rs = await asyncio.gather(
        *(h.api.delete(h.p("k"), headers={"If-Match": tag}) for _ in range(16))
    )
    codes = Counter(r.status_code for r in rs)
    # Once one delete won the key is absent, and the contract answers 404 to a DELETE of an
    # absent key whatever the preconditions.
    assert codes == {204: 1, 404: 15}, codes
    assert (await h.api.get(h.p("k"))).status_code == 404


@CACHED
async def test_concurrent_creates_with_if_none_match_star_exactly_one_wins(h: Harness) -> None:
    await h.prepare(h.p("k"))
    rs = await asyncio.gather(
        *(h.api.put(h.p("k"), json={"v": i}, headers={"If-None-Match": "*"}) for i in range(16))
    )
    codes = Counter(r.status_code for r in rs)
    assert codes == {201: 1, 412: 15}, codes
    winner = next(i for i, r in enumerate(rs) if r.status_code == 201)
    assert (await h.api.get(h.p("k"))).json() == {"v": winner}
