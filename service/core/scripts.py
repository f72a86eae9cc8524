"""The Lua scripts of the write-behind core, registered once per Redis client.

redis-py's Script objects call EVALSHA and reload the script on NOSCRIPT (e.g. after a
Redis restart), so each call costs one round trip. Every key a script touches is in its KEYS
(tests/integration/test_script_keys.py checks it, statically and while they run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files

from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from service.adapters.redis import AnyRedis


def _read(name: str) -> str:
    return (files("service.core") / "lua" / name).read_text(encoding="utf-8")


def _source(name: str) -> str:
    """Script ``name``, each line ``-- include <file>.lua`` replaced by that file (Lua that
    several scripts share: each script is sent to Redis whole)."""
    return _INCLUDE.sub(lambda m: _read(m.group(1)).rstrip("\n"), _read(f"{name}.lua"))


_INCLUDE = re.compile(r"^-- include (\w+\.lua)$", re.MULTILINE)


# Where write_many.lua takes write.lua's text: one write path, whichever script runs it.
_WRITE_BODY = "--[[write.lua]]"


def _write_many_source() -> str:
    outer = _source("write_many")
    if outer.count(_WRITE_BODY) != 1:
        raise AssertionError("write_many.lua must name the place of write.lua's text once")
    return outer.replace(_WRITE_BODY, _source("write"))


class _Script(AsyncScript):
    """redis-py's AsyncScript, sending the script's body (EVAL, which also caches it on
    that node) when the node still answers NOSCRIPT after the SCRIPT LOAD: on a Cluster
    mid-resharding, redis-py's SCRIPT LOAD to every primary can miss the slot's new owner
    (a node it has wrongly marked as a replica while following ASK)."""

    async def __call__(  # type: ignore[no-untyped-def]
        self, keys=None, args=None, client=None
    ):
        try:
            return await super().__call__(keys, args, client)
        except NoScriptError:
            keys, args = list(keys or []), list(args or [])
            target = client if client is not None else self.registered_client
            return await target.eval(self.script, len(keys), *keys, *args)  # type: ignore[arg-type,misc]


def script(redis: AnyRedis, source: str) -> AsyncScript:
    """``register_script`` for either client: redis-py's AsyncScript works with a
    ``RedisCluster`` too (EVALSHA routed by its keys; SCRIPT LOAD, after NOSCRIPT, sent to
    every primary), though it is typed for ``Redis`` alone."""
    return _Script(redis, source)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Scripts:
    write: AsyncScript
    write_many: AsyncScript
    fill: AsyncScript
    candidates: AsyncScript
    take_over: AsyncScript
    claim: AsyncScript
    release: AsyncScript
    committed: AsyncScript
    invalidate: AsyncScript
    dead_letters: AsyncScript
    heartbeat: AsyncScript
    key_filter: AsyncScript
    key_filter_check: AsyncScript
    purge_add: AsyncScript
    purge_claim: AsyncScript
    purge_settle: AsyncScript
    cache_ttl: AsyncScript

    @classmethod
    def register(cls, redis: AnyRedis) -> Scripts:
        return cls(
            write=script(redis, _source("write")),
            write_many=script(redis, _write_many_source()),
            fill=script(redis, _source("fill")),
            candidates=script(redis, _source("candidates")),
            take_over=script(redis, _source("takeover")),
            claim=script(redis, _source("claim")),
            release=script(redis, _source("release")),
            committed=script(redis, _source("committed")),
            invalidate=script(redis, _source("invalidate")),
            dead_letters=script(redis, _source("deadletters")),
            heartbeat=script(redis, _source("heartbeat")),
            key_filter=script(redis, _source("keyfilter")),
            key_filter_check=script(redis, _source("keyfilter_check")),
            purge_add=script(redis, _source("purge_add")),
            purge_claim=script(redis, _source("purge_claim")),
            purge_settle=script(redis, _source("purge_settle")),
            cache_ttl=script(redis, _source("cache_ttl")),
        )
