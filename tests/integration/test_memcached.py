"""The memcached door's semantics, seen through pymemcache (run in a thread: it blocks) and
raw protocol lines: one store with HTTP, byte-identical values with their flags, cas as
the record version, add/replace/append/prepend/incr/decr, errors as memcached gives them."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest
from pymemcache.client.base import Client as PyMemcache

from service.api.app import create_app
from service.config import Settings
from service.core.shards import Shards
from tests.conftest import running_worker, wait_drained, wait_until
from tests.support.memcached import Door, Raw, running_door


@pytest.fixture
async def door(settings: Settings, pg: asyncpg.Connection, redis: Any) -> AsyncIterator[Door]:
    async with running_door(settings) as d:
        yield d


PyMc = Callable[[Door], PyMemcache]


@pytest.fixture
def pymc() -> Iterator[PyMc]:
    """pymemcache clients, closed at the end."""
    made: list[PyMemcache] = []

    def make(door: Door) -> PyMemcache:
        made.append(
            PyMemcache((door.host, door.port), timeout=10, connect_timeout=5, default_noreply=False)
        )
        return made[-1]

    yield make
    for client in made:
        client.close()


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A blocking client call, off the event loop that runs the server."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def test_set_get_delete_and_one_store_with_http(door: Door, pymc: PyMc) -> None:
    mc = pymc(door)
    assert await call(mc.set, "users:1", b'{"name":"ada"}') is True
    assert await call(mc.get, "users:1") == b'{"name":"ada"}'
    r = await door.http.get("/v1/users/1")
    assert r.status_code == 200 and r.json() == {"name": "ada"}
    # A record written over HTTP reads back as its canonical JSON.
    await door.http.put("/v1/users/2", json={"b": 1, "a": [1, 2]})
    assert await call(mc.get, "users:2") == b'{"a":[1,2],"b":1}'
    # A bare key lives in MEMCACHED_COLLECTION (kv).
    assert await call(mc.set, "plain", b"hello", 0, 0) is True
    r = await door.http.get("/v1/kv/plain")
    assert r.json() == {"$memcached": {"flags": 0, "text": "hello"}}
    assert await call(mc.delete, "users:1", noreply=False) is True
    assert await call(mc.get, "users:1") is None
    assert (await door.http.get("/v1/users/1")).status_code == 404
    assert await call(mc.delete, "users:1", noreply=False) is False


async def test_every_byte_value_and_flags_come_back_identical(door: Door, pymc: PyMc) -> None:
    mc = pymc(door)
    every = bytes(range(256)) * 3
    cases = {
        "bin:all": (every, 0),
        "bin:flags": (b"\x80\x04\x95pickle", 1),
        "bin:maxflags": (b"x", 2**32 - 1),
        "bin:empty": (b"", 7),
        "bin:json-spaces": (b'{"a": 1}', 0),  # JSON, not canonical: kept byte for byte
        "bin:json-flags": (b'{"a":1}', 2),
        "bin:crlf": (b"a\r\nEND\r\nb", 0),
        "bin:wrapper-lookalike": (b'{"$memcached":{"flags":0,"text":"x"}}', 0),
    }
    for key, (value, flags) in cases.items():
        assert await call(mc.set, key, value, 0, False, flags) is True, key
    raw = await Raw.connect(door)
    for key, (value, flags) in cases.items():
        await raw.send(b"get %s\r\n" % key.encode())
        assert await raw.line() == b"VALUE %s %d %d\r\n" % (key.encode(), flags, len(value))
        assert await raw.exactly(len(value) + 2) == value + b"\r\n"
        assert await raw.line() == b"END\r\n"
    await raw.close()
    # Over HTTP the binary value is base64 in the wrapper.
    body = (await door.http.get("/v1/bin/all")).json()["$memcached"]
    assert body["flags"] == 0 and "base64" in body


async def test_values_survive_the_flush_to_postgres_and_eviction(
    door: Door, settings: Settings, redis: Any, pg: asyncpg.Connection, pymc: PyMc
) -> None:
    mc = pymc(door)
    blob = bytes(range(256))
    assert await call(mc.set, "kv:blob", blob, 0, False, 5) is True
    async with running_worker(settings):
        await wait_drained(door.http)
    row = await pg.fetchval("SELECT value FROM records WHERE collection='kv' AND key='blob'")
    assert json.loads(row)["$memcached"]["flags"] == 5
    await door.http.post("/v1/kv/_invalidate", json={"keys": ["blob"]})
    async for k in redis.scan_iter(match=f"{settings.redis_prefix}*e:kv:blob"):
        await redis.delete(k)
    assert await call(mc.gets, "kv:blob") == (blob, await _version(door, "kv", "blob"))
    raw = await Raw.connect(door)
    await raw.send(b"get kv:blob\r\n")
    assert await raw.line() == b"VALUE kv:blob 5 256\r\n"
    await raw.close()


async def _version(door: Door, collection: str, key: str) -> bytes:
    r = await door.http.get(f"/v1/{collection}/{key}")
    return r.headers["etag"].strip('"').encode()


async def test_gets_cas_is_the_version_and_cas_answers(door: Door, pymc: PyMc) -> None:
    mc = pymc(door)
    await call(mc.set, "c:1", b"one")
    value, cas = await call(mc.gets, "c:1")
    assert value == b"one" and cas == await _version(door, "c", "1")
    assert await call(mc.cas, "c:1", b"two", cas) is True
    assert await call(mc.cas, "c:1", b"three", cas) is False  # EXISTS: stale cas
    assert await call(mc.get, "c:1") == b"two"
    assert await call(mc.cas, "c:absent", b"x", b"12345") is None  # NOT_FOUND
    # An If-Match over HTTP with the cas unique as ETag.
    _, cas2 = await call(mc.gets, "c:1")
    r = await door.http.put("/v1/c/1", json={"v": 3}, headers={"If-Match": f'"{cas2.decode()}"'})
    assert r.status_code == 200


async def test_concurrent_cas_exactly_one_wins(door: Door, pymc: PyMc) -> None:
    mc = pymc(door)
    await call(mc.set, "race:k", b"0")
    for round_ in range(5):
        _, cas = await call(mc.gets, "race:k")
        clients = [pymc(door) for _ in range(16)]
        results = await asyncio.gather(
            *(call(c.cas, "race:k", b"%d-%d" % (round_, i), cas) for i, c in enumerate(clients))
        )
        assert results.count(True) == 1, results
        assert results.count(False) == 15, results
        winner = results.index(True)
        assert await call(mc.get, "race:k") == b"%d-%d" % (round_, winner)


async def test_add_replace_append_prepend(door: Door, pymc: PyMc) -> None:
    mc = pymc(door)
    assert await call(mc.add, "m:a", b"1", noreply=False) is True
    assert await call(mc.add, "m:a", b"2", noreply=False) is False
    assert await call(mc.replace, "m:b", b"x", noreply=False) is False
    assert await call(mc.replace, "m:a", b"3", noreply=False) is True
    assert await call(mc.append, "m:a", b"4", noreply=False) is True
    assert await call(mc.prepend, "m:a", b"2", noreply=False) is True
    assert await call(mc.get, "m:a") == b"234"
    assert await call(mc.append, "m:none", b"x", noreply=False) is False
    # add on a deleted key succeeds again
    await call(mc.delete, "m:a")
    assert await call(mc.add, "m:a", b"again", noreply=False) is True


async def test_incr_decr_are_atomic_under_concurrency(door: Door, pymc: PyMc) -> None:
    mc = pymc(door)
    assert await call(mc.incr, "n:absent", 1) is None
    await call(mc.set, "n:c", b"10")
    assert await call(mc.incr, "n:c", 5) == 15
    assert await call(mc.decr, "n:c", 100) == 0
    await call(mc.set, "n:wrap", b"18446744073709551615")
    assert await call(mc.incr, "n:wrap", 2) == 1
    await call(mc.set, "n:c", b"0")
    clients = [pymc(door) for _ in range(8)]
    await asyncio.gather(*(call(_bump, c, 25) for c in clients))
    assert await call(mc.get, "n:c") == b"200"
    # The counter is a JSON number over HTTP.
    assert (await door.http.get("/v1/n/c")).json() == 200
    raw = await Raw.connect(door)
    await call(mc.set, "n:text", b"abc")
    reply = await raw.ask(b"incr n:text 1\r\n")
    assert reply == b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    assert await raw.ask(b"incr n:c x\r\n") == b"CLIENT_ERROR invalid numeric delta argument\r\n"
    await raw.close()


def _bump(client: PyMemcache, times: int) -> None:
    for _ in range(times):
        client.incr("n:c", 1)


async def test_errors_as_memcached_gives_them(door: Door) -> None:
    raw = await Raw.connect(door)
    assert await raw.ask(b"bogus\r\n") == b"ERROR\r\n"
    assert await raw.ask(b"\r\n") == b"ERROR\r\n"
    assert await raw.ask(b"set k 0 0 notanumber\r\n") == b"CLIENT_ERROR bad command line format\r\n"
    # A data block of the wrong length: refused, nothing written, the connection goes on.
    await raw.send(b"set half 0 0 3\r\nabcdef\r\n")
    assert await raw.line() == b"CLIENT_ERROR bad data chunk\r\n"
    assert await raw.line() == b"ERROR\r\n"  # "ef" read as a command, as memcached does
    assert await raw.ask(b"get half\r\n") == b"END\r\n"
    long_key = b"k" * 251
    assert await raw.ask(b"get " + long_key + b"\r\n") == (
        b"CLIENT_ERROR bad command line format\r\n"
    )
    # A value past the limit is read and thrown away.
    big = 2 * 1024 * 1024
    await raw.send(b"set big 0 0 %d\r\n" % big + b"x" * big + b"\r\n")
    assert await raw.line() == b"SERVER_ERROR object too large for cache\r\n"
    assert await raw.ask(b"version\r\n") == b"VERSION 1.6.0\r\n"
    assert await raw.ask(b"verbosity 1\r\n") == b"OK\r\n"
    assert (await raw.ask(b"flush_all\r\n")).startswith(b"SERVER_ERROR flush_all is disabled")
    await raw.send(b"stats\r\n")
    stats = await raw.until_end()
    assert b"STAT curr_connections 1\r\n" in stats and b"STAT cmd_get " in stats
    await raw.send(b"quit\r\n")
    assert await raw.reader.read() == b""
    await raw.close()


async def test_noreply_pipeline_of_thousands_of_sets(door: Door) -> None:
    raw = await Raw.connect(door)
    n = 5000
    lines = b"".join(
        b"set p:%d 0 0 %d noreply\r\nv%d\r\n" % (i, len(b"v%d" % i), i) for i in range(n)
    )
    await raw.send(lines + b"get p:0 p:4999\r\n")
    reply = await raw.until_end()
    assert reply == b"VALUE p:0 0 2\r\nv0\r\nVALUE p:4999 0 5\r\nv4999\r\nEND\r\n"
    # Every one is a record; a bad one in the pipeline harms nothing after it.
    await raw.send(b"set p:x 0 0 zz noreply\r\nset p:y 0 0 1 noreply\r\ny\r\nmn\r\n")
    assert await raw.line() == b"MN\r\n"
    assert await raw.ask(b"get p:y\r\n") == b"VALUE p:y 0 1\r\n"
    await raw.close()
    r = await door.http.get("/v1/stats")
    assert r.json()["pending"] >= n


async def test_a_bad_connection_does_not_harm_its_neighbours(door: Door) -> None:
    good, bad = await Raw.connect(door), await Raw.connect(door)
    await bad.send(b"set x 0 0 10\r\nonly")  # half a value, then gone
    await bad.close()
    assert await good.ask(b"set x 0 0 1\r\n1\r\n") == b"STORED\r\n"
    assert await good.ask(b"get x\r\n") == b"VALUE x 0 1\r\n"
    await good.close()


async def test_touch_gat_and_exptime_bound_only_the_cached_copy(
    door: Door, settings: Settings, redis: Any, pymc: PyMc
) -> None:
    mc = pymc(door)
    assert await call(mc.set, "t:1", b"v", 1) is True  # expires in 1 s: the cached copy only
    async with running_worker(settings):
        await wait_drained(door.http)
    entry = Shards.from_settings(settings).for_record("t", "1").entry("t", "1")

    async def gone() -> bool:
        return not await redis.exists(entry)

    await wait_until(gone, timeout=10)
    assert await call(mc.get, "t:1") == b"v"  # read through from Postgres
    assert await call(mc.touch, "t:1", 100, noreply=False) is True
    assert 0 < await redis.pttl(entry) <= 100_000
    assert await call(mc.touch, "t:none", 100, noreply=False) is False
    raw = await Raw.connect(door)
    await raw.send(b"gats 50 t:1 t:none\r\n")
    assert await raw.until_end() == b"VALUE t:1 0 1 %s\r\nv\r\nEND\r\n" % await _version(
        door, "t", "1"
    )
    await raw.close()
    assert 0 < await redis.pttl(entry) <= 50_000


async def test_meta_commands(door: Door) -> None:
    raw = await Raw.connect(door)
    assert (
        await raw.ask(b"ms m:1 2 F3 T0 c\r\nhi\r\n")
        == b"HD c" + await _version(door, "m", "1") + b"\r\n"
    )
    await raw.send(b"mg m:1 v f s k Oabc\r\n")
    assert await raw.line() == b"VA 2 f3 s2 km:1 Oabc\r\n"
    assert await raw.line() == b"hi\r\n"
    assert await raw.ask(b"mg m:none v\r\n") == b"EN\r\n"
    await raw.send(b"mg m:none v q\r\nmn\r\n")
    assert await raw.line() == b"MN\r\n"
    assert await raw.ask(b"ms m:1 1 ME\r\nx\r\n") == b"NS\r\n"
    assert await raw.ask(b"ms m:1 1 MA\r\n!\r\n") == b"HD\r\n"
    assert await raw.ask(b"ms m:1 1 C1\r\nx\r\n") == b"EX\r\n"
    assert await raw.ask(b"ma m:n\r\n") == b"NF\r\n"
    await raw.send(b"ma m:n N0 J10 v\r\n")
    assert await raw.line() == b"VA 2\r\n" and await raw.line() == b"10\r\n"
    await raw.send(b"ma m:n D5 MD v\r\n")
    assert await raw.line() == b"VA 1\r\n" and await raw.line() == b"5\r\n"
    assert await raw.ask(b"md m:n q\r\nmn\r\n") == b"MN\r\n"
    assert await raw.ask(b"md m:n\r\n") == b"NF\r\n"
    await raw.send(b"mg m:1 v\r\n")
    assert await raw.line() == b"VA 3\r\n" and await raw.line() == b"hi!\r\n"
    assert (await raw.ask(b"mg m:1 Z\r\n")).startswith(b"CLIENT_ERROR")
    await raw.close()


async def test_flush_all_when_allowed_deletes_through_the_write_path(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any, pymc: PyMc
) -> None:
    async with running_door(settings_factory(memcached_allow_flush=True)) as door:
        mc = pymc(door)
        for i in range(20):
            await call(mc.set, f"f{i}", b"x")
        await call(mc.set, "other:1", b"kept")
        assert await call(mc.flush_all, noreply=False) is True
        assert await call(mc.get_many, [f"f{i}" for i in range(20)]) == {}
        assert await call(mc.get, "other:1") == b"kept"
        assert (await door.http.get("/v1/kv/f3")).status_code == 404


async def test_backpressure_answers_server_error(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    # One shard: MAX_PENDING bounds each shard's queue (16 of them on a Cluster).
    async with running_door(settings_factory(max_pending=3, redis_shards=1)) as door:
        raw = await Raw.connect(door)
        for i in range(3):
            assert await raw.ask(b"set bp:%d 0 0 1\r\nx\r\n" % i) == b"STORED\r\n"
        reply = await raw.ask(b"set bp:9 0 0 1\r\nx\r\n")
        assert reply.startswith(b"SERVER_ERROR out of memory") and b"MAX_PENDING" in reply
        assert await raw.ask(b"set bp:0 0 0 1\r\ny\r\n") == b"STORED\r\n"  # already pending
        await raw.close()


async def test_a_write_through_collection_answers_stored_once_committed(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    settings = settings_factory(collection_write_mode={"wt": "through"})
    async with running_door(settings) as door, running_worker(settings):
        raw = await Raw.connect(door)
        assert await raw.ask(b"set wt:k 3 0 2\r\nab\r\n") == b"STORED\r\n"
        # Committed before the answer: no waiting here.
        row = await pg.fetchval("SELECT value::text FROM records WHERE collection='wt'")
        assert row is not None and '"text": "ab"' in row
        assert await raw.ask(b"delete wt:k\r\n") == b"DELETED\r\n"
        assert await pg.fetchval("SELECT count(*) FROM records WHERE collection='wt'") == 0
        await raw.close()


async def test_metrics_and_stats_count_commands_and_hidden_errors(door: Door) -> None:
    raw = await Raw.connect(door)
    assert await raw.ask(b"set mx:1 0 0 1\r\nx\r\n") == b"STORED\r\n"
    # An error nobody hears (noreply), then a command whose answer shows it was counted.
    await raw.send(b"incr mx:1 1 noreply\r\n")
    await raw.send(b"stats\r\n")
    stats = await raw.until_end()
    assert b"STAT noreply_errors 1\r\n" in stats, stats
    await raw.close()
    text = (await door.http.get("/metrics")).text
    assert 'wbcache_memcached_command_duration_seconds_count{command="set",outcome="ok"} 1.0' in (
        text
    )
    assert (
        'wbcache_memcached_command_duration_seconds_count{command="incr",outcome="client_error"}'
        in text
    )


async def test_connections_past_the_limit_are_refused_and_the_bind_is_local(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    settings = settings_factory(memcached_max_connections=1)
    assert settings.memcached_bind == "127.0.0.1"  # no authentication: local by default
    async with running_door(settings) as door:
        first = await Raw.connect(door)
        assert await first.ask(b"version\r\n") == b"VERSION 1.6.0\r\n"
        second = await Raw.connect(door)
        assert await second.line() == b"SERVER_ERROR too many open connections\r\n"
        assert await second.reader.read() == b""
        await second.close()
        assert await first.ask(b"mn\r\n") == b"MN\r\n"  # the first one is unharmed
        await first.close()


async def test_a_port_in_use_fails_the_start(
    settings_factory: Callable[..., Settings], pg: asyncpg.Connection, redis: Any
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        app = create_app(settings_factory(memcached_port=taken.getsockname()[1]))
        with pytest.raises(OSError):
            async with app.router.lifespan_context(app):
                pass
    finally:
        taken.close()
