"""Every key a Lua script touches is declared in KEYS (issue 10): what Redis Cluster needs
(a script's keys must be known to route it and to live in one slot).

Redis enforces none of it, in any mode. Tried on a one-node Cluster of Redis 7.0 holding
every slot: an undeclared key is refused only if it hashes to another slot than the
declared keys (and only in scripts with a shebang; without one, not even then), or to a
slot the node does not hold. An undeclared key in the declared keys' slot, which is what
a shard's hash tag will make of every key, runs. So the proof is twofold:

* statically: in every script, each key argument of ``redis.call`` is ``KEYS[...]`` or a
  local assigned only from ``KEYS[...]`` (no key name built from a prefix and a member);
* dynamically: every script runs with a guard in front of it that checks each command's
  key arguments (their positions as Redis' own COMMAND INFO gives them) against KEYS and
  fails the call otherwise, and the callers (API, flusher, dead letters, stats, heartbeat)
  are driven through every path: write, batch, fill, invalidate, claim, take-over, release
  with commits and dead letters, write-through, dead-letter retry and drop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis import Redis as SyncRedis
from redis.exceptions import ResponseError

from service.adapters.postgres import PgPool
from service.adapters.redis import create_redis
from service.config import Settings
from service.core import scripts as scripts_module
from service.core import stats as stats_module
from service.core.flusher import Flusher
from service.core.key_filter_build import complete_filters
from service.core.scripts import Scripts
from tests.conftest import running_api
from tests.integration.test_dead_letters import poison_constraint

LUA = Path(str(files("service.core") / "lua"))

# -- statically ---------------------------------------------------------------------------

# Commands whose key is their first argument; commands whose arguments are all keys; and
# commands without keys. A script using any other command fails here until it is added.
FIRST_KEY = {
    "get", "set", "pexpire", "pexpireat", "persist", "pttl",
    "hget", "hset", "hdel", "hmget", "hgetall", "hexists", "hincrby", "hlen",
    "zadd", "zrem", "zscore", "zmscore", "zrangebyscore", "zremrangebyscore", "zcard",
    "bitfield", "getbit", "setbit",
}  # fmt: skip
ALL_KEYS = {"del", "exists"}
# Commands whose first argument is an operation and all the others keys.
KEYS_AFTER_FIRST = {"bitop"}
NO_KEYS = {"time"}

_KEYS_REF = re.compile(r"KEYS\[[^\[\]]+\]")
_ASSIGN = re.compile(r"^\s*(?:local\s+)?([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)\s*=(?!=)\s*(.+)$")


def _code(source: str) -> str:
    """``source`` without its comments (quote-aware; Lua long strings are not used)."""
    out: list[str] = []
    for line in source.splitlines():
        quote = ""
        for i, ch in enumerate(line):
            if quote:
                if ch == quote and line[i - 1] != "\\":
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif line.startswith("--", i):
                line = line[:i]
                break
        out.append(line)
    return "\n".join(out)


def _split_args(code: str, start: int) -> list[str]:
    """The comma-separated arguments of the call whose ``(`` is just before ``start``."""
    args: list[str] = []
    depth = 0
    quote = ""
    current = ""
    for i in range(start, len(code)):
        ch = code[i]
        if quote:
            current += ch
            if ch == quote and code[i - 1] != "\\":
                quote = ""
            continue
        if ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            if depth == 0:
                args.append(current.strip())
                return args
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(current.strip())
            current = ""
            continue
        current += ch
    raise AssertionError("unbalanced call")


def undeclared_key_uses(source: str) -> list[str]:
    """Each ``redis.call`` key argument that is not ``KEYS[...]`` nor a local assigned only
    from ``KEYS[...]``, as "COMMAND expression"; or the commands this check does not know."""
    code = _code(source)
    bound: dict[str, list[str]] = {}
    for line in code.splitlines():
        m = _ASSIGN.match(line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            try:
                values = _split_args(m.group(2) + ")", 0)
            except AssertionError:  # continued on the next line: not a KEYS[...] alone
                values = [m.group(2)] * len(names)
            for n, name in enumerate(names):
                bound.setdefault(name, []).append(values[n] if n < len(values) else "nil")

    def declared(expr: str) -> bool:
        if _KEYS_REF.fullmatch(expr):
            return True
        values = bound.get(expr, [])
        return bool(values) and all(_KEYS_REF.fullmatch(v) for v in values)

    problems: list[str] = []
    for call in re.finditer(r"redis\.p?call\(", code):
        args = _split_args(code, call.end())
        command = args[0].strip("'\"").lower()
        if command in NO_KEYS:
            continue
        if command in FIRST_KEY:
            keys = args[1:2]
        elif command in ALL_KEYS:
            keys = args[1:]
        elif command in KEYS_AFTER_FIRST:
            keys = args[2:]
        else:
            problems.append(f"{command}: a command this check does not know")
            continue
        problems += [f"{command.upper()} {k}" for k in keys if not declared(k)]
    return problems


def _all_scripts() -> Iterator[tuple[str, str]]:
    for path in sorted(LUA.glob("*.lua")):
        yield path.name, path.read_text(encoding="utf-8")
    yield "stats._PENDING_COUNTS", stats_module._PENDING_COUNTS


def test_the_static_check_sees_keys_built_in_lua() -> None:
    built = """
local prefix = ARGV[6]
local dirty, bk = KEYS[1], prefix .. 'b:' .. ARGV[1]
local e = KEYS[2]
e = ARGV[3]
redis.call('HMGET', prefix .. 'e:' .. ARGV[2], 'v')  -- KEYS[1]
redis.call('DEL', KEYS[1], bk)
redis.call('ZADD', dirty, 1, 'm')
redis.call('HGET', e, 'v')
redis.call('RENAME', KEYS[1], KEYS[2])
"""
    assert undeclared_key_uses(built) == [
        "HMGET prefix .. 'e:' .. ARGV[2]",
        "DEL bk",
        "HGET e",
        "rename: a command this check does not know",
    ]


@pytest.mark.parametrize("name,source", list(_all_scripts()), ids=[n for n, _ in _all_scripts()])
def test_every_key_a_script_touches_is_in_keys(name: str, source: str) -> None:
    assert undeclared_key_uses(source) == []
    # Nor can a script build one: no script is given the key prefix.
    assert "prefix" not in _code(source)


# -- dynamically --------------------------------------------------------------------------

_GUARD = """
local __declared = {}
for _, k in ipairs(KEYS) do __declared[k] = true end
local __specs = {%s}
local __redis = redis
local function __guarded(call)
  return function(cmd, ...)
    local spec = __specs[string.lower(cmd)]
    if not spec then
      error('key guard: ' .. cmd .. ' is not in COMMAND INFO')
    end
    local first, last, step = spec[1], spec[2], spec[3]
    if first > 0 then
      local args, n = {...}, select('#', ...)
      if last < 0 then
        last = n + 1 + last
      end
      for p = first, last, step do
        if not __declared[args[p]] then
          error('undeclared key ' .. tostring(args[p]) .. ' in ' .. cmd)
        end
      end
    end
    return call(cmd, ...)
  end
end
local redis = setmetatable(
  {call = __guarded(__redis.call), pcall = __guarded(__redis.pcall)}, {__index = __redis})
"""


def _commands(source: str) -> set[str]:
    return {m.lower() for m in re.findall(r"redis\.p?call\(\s*'(\w+)'", source)}


def _command_specs(client: Any, names: set[str]) -> dict[str, tuple[int, int, int]]:
    """(first key, last key, step) of each command, from Redis itself."""
    specs = {}
    for name in sorted(names):
        reply = client.execute_command("COMMAND", "INFO", name, NEVER_DECODE=True)
        info = reply[name] if isinstance(reply, dict) else reply[0]
        first, last, step = (info[k] for k in ("first_key_pos", "last_key_pos", "step_count"))
        assert "movablekeys" not in info.get("flags", []), name
        specs[name] = (int(first), int(last), int(step))
    return specs


def guarded(source: str, specs: dict[str, tuple[int, int, int]]) -> str:
    """``source`` with the guard in front (after a shebang line, which must stay first)."""
    table = ", ".join(f"['{n}'] = {{{f}, {la}, {s}}}" for n, (f, la, s) in sorted(specs.items()))
    guard = _GUARD % table
    if source.startswith("#!"):
        shebang, _, body = source.partition("\n")
        return f"{shebang}\n{guard}\n{body}"
    return f"{guard}\n{source}"


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Callable[[str], str]:
    """Every script of the service, as Scripts.register and stats load it, guarded; and
    the guard, for other scripts."""
    sources = dict(_all_scripts())
    client = SyncRedis.from_url(settings.redis_url)
    try:
        specs = _command_specs(client, set().union(*map(_commands, sources.values())))
    finally:
        client.close()
    real = scripts_module._source
    monkeypatch.setattr(scripts_module, "_source", lambda name: guarded(real(name), specs))
    monkeypatch.setattr(
        stats_module, "_PENDING_COUNTS", guarded(stats_module._PENDING_COUNTS, specs)
    )
    return lambda source: guarded(source, specs)


@pytest.fixture
async def api(
    guard: Any, settings: Settings, pg: asyncpg.Connection, redis: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings) as client:
        yield client


@pytest.fixture
async def flusher(guard: Any, settings: Settings, redis: Any) -> AsyncIterator[Flusher]:
    client = create_redis("test-flusher", settings)
    pool = PgPool("test-flusher", settings)
    yield Flusher(client, pool, settings, Scripts.register(client))
    await pool.close()
    await client.aclose(close_connection_pool=True)


async def test_the_guard_refuses_an_undeclared_key(guard: Callable[[str], str], redis: Any) -> None:
    script = redis.register_script(guard("return redis.call('GET', ARGV[1])"))
    with pytest.raises(ResponseError) as caught:
        await script(keys=[], args=["wbt-undeclared"])
    assert "undeclared key wbt-undeclared in GET" in str(caught.value)
    declared = redis.register_script(guard("#!lua\nreturn redis.call('GET', KEYS[1])"))
    assert await declared(keys=["wbt-undeclared"]) is None


async def _flush_all(f: Flusher) -> int:
    """Claim and flush until nothing is due (the writes' delay is 0 here)."""
    flushed = 0
    while (batch := await f.claim()) is not None:
        assert await f.flush_batch(batch)
        flushed += len(batch.items)
    return flushed


async def test_every_path_runs_with_only_declared_keys(
    api: httpx.AsyncClient,
    flusher: Flusher,
    settings_factory: Any,
    pg: asyncpg.Connection,
) -> None:
    f = Flusher(flusher.redis, flusher.pg, settings_factory(write_delay_ms=0), flusher.scripts)

    # Writes (write.lua), alone and batched; a miss that fills an absent key (fill.lua).
    for i in range(6):
        assert (await api.put(f"/v1/ka/k{i}", json={"i": i})).status_code == 201
    merge = {"Content-Type": "application/merge-patch+json"}
    assert (await api.patch("/v1/ka/k1", content=b'{"p": 1}', headers=merge)).status_code == 200
    assert (await api.delete("/v1/ka/k2")).status_code == 204
    ops = [
        {"op": "put", "collection": "kb", "key": "b1", "document": {"b": 1}},
        {"op": "put", "collection": "kb", "key": "b2", "document": {"b": 2}},
        {"op": "get", "collection": "kb", "key": "b1"},
    ]
    r = await api.post("/v1/batch", json={"operations": ops})
    assert [x["status"] for x in r.json()["results"]] == [201, 201, 200], r.text
    assert (await api.get("/v1/ka/absent")).status_code == 404
    assert (await api.get("/v1/stats")).json()["pending_by_collection"] == {"ka": 6, "kb": 2}

    # Claim, persist, release with commits (claim.lua, release.lua).
    assert await _flush_all(f) == 8
    assert await pg.fetchval("SELECT count(*) FROM records") == 7

    # The key filter, lost with Redis' data, completed again by a worker (keyfilter.lua).
    await f.redis.delete(f.key_filter.key(f.keys))
    assert await complete_filters(f.redis, f.pg, f.shards, f.key_filter, f.scripts) == [0]

    # A worker dies holding a batch: the next claim takes it over (takeover.lua), while
    # a live one renews its lease and heartbeat (heartbeat.lua) and hands back (release).
    assert (await api.put("/v1/kc/dead", json={"c": 1})).status_code == 201
    dead = await f.claim()
    assert dead is not None and [i.member for i in dead.items] == ["kc:dead"]
    f.held.discard(dead.id)
    await f.redis.zadd(f.keys.leases, {dead.id: 0})
    other = Flusher(f.redis, f.pg, f.settings, f.scripts)
    taken = await other.claim()
    assert taken is not None and [i.member for i in taken.items] == ["kc:dead"]
    await other.renew_leases("wbt-worker")
    await other.hand_back_all()
    assert await _flush_all(other) == 1

    # Poison: dead-lettered on release, retried and dropped by an operator (deadletters.lua).
    async with poison_constraint(pg):
        assert (await api.put("/v1/kp/p", json={"poison": True})).status_code == 201
        assert await _flush_all(f) == 1
        assert (await api.get("/v1/stats")).json()["dead_letters"] == 1
        assert (await api.post("/v1/dead-letters:retry")).json() == {"retried": 1}
        assert await _flush_all(f) == 1
        [letter] = (await api.get("/v1/dead-letters")).json()["items"]
        assert letter["attempts"] == 2
        assert (await api.post("/v1/dead-letters:drop")).json() == {"dropped": 1}

    # Write-through: an explicit claim of one member.
    r = await api.put("/v1/kt/k", json={"t": 1}, headers={"Write-Mode": "through"})
    assert r.status_code == 201, r.text
    assert (
        await pg.fetchval("SELECT version FROM records WHERE collection = 'kt'")
        == r.json()["version"]
    )

    # Invalidation by keys and by scan (invalidate.lua); the next read fills (fill.lua).
    r = await api.post("/v1/invalidate", json={"collection": "ka", "keys": ["k0", "k1"]})
    assert r.json() == {"invalidated": 2, "skipped_pending": 0}
    assert (await api.put("/v1/ka/k3", json={"pending": True})).status_code == 200
    r = await api.post("/v1/invalidate", json={"collection": "ka"})
    # k2 (a tombstone), k4, k5 and the absent key's negative entry; k3 is pending.
    assert r.json() == {"invalidated": 4, "skipped_pending": 1}
    assert (await api.get("/v1/ka/k1")).json() == {"i": 1, "p": 1}
    assert await _flush_all(f) == 1
    s = (await api.get("/v1/stats")).json()
    assert s["pending"] == 0 and s["dead_letters"] == 0


async def test_concurrent_claims_both_get_work(
    api: httpx.AsyncClient, flusher: Flusher, settings_factory: Any
) -> None:
    """Two claims that read the same candidates: one takes them, the other reads again and
    takes the next ones, rather than report that nothing is due (which would end a drain
    loop early)."""
    small = settings_factory(write_delay_ms=0, batch_size=10)
    for i in range(20):
        assert (await api.put(f"/v1/kr/k{i:02}", json={"i": i})).status_code == 201
    a = Flusher(flusher.redis, flusher.pg, small, flusher.scripts)
    b = Flusher(flusher.redis, flusher.pg, small, flusher.scripts)
    first, second = await asyncio.gather(a.claim(), b.claim())
    assert first is not None and second is not None
    claimed = [i.member for i in first.items + second.items]
    assert sorted(claimed) == [f"kr:k{i:02}" for i in range(20)]
    assert await a.claim() is None
    await a.release(first, [], [])
    await b.release(second, [], [])
