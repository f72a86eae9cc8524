"""The Lua scripts of the write-behind core, registered once per Redis client.

redis-py's Script objects call EVALSHA and reload the script on NOSCRIPT (e.g. after a
Redis restart), so each call costs one round trip. Every key a script touches is in its KEYS
(tests/integration/test_script_keys.py checks it, statically and while they run).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


def _source(name: str) -> str:
    return (files("service.core") / "lua" / f"{name}.lua").read_text(encoding="utf-8")


@dataclass(frozen=True)
class Scripts:
    write: AsyncScript
    fill: AsyncScript
    candidates: AsyncScript
    take_over: AsyncScript
    claim: AsyncScript
    release: AsyncScript
    invalidate: AsyncScript
    dead_letters: AsyncScript
    heartbeat: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        return cls(
            write=redis.register_script(_source("write")),
            fill=redis.register_script(_source("fill")),
            candidates=redis.register_script(_source("candidates")),
            take_over=redis.register_script(_source("takeover")),
            claim=redis.register_script(_source("claim")),
            release=redis.register_script(_source("release")),
            invalidate=redis.register_script(_source("invalidate")),
            dead_letters=redis.register_script(_source("deadletters")),
            heartbeat=redis.register_script(_source("heartbeat")),
        )
