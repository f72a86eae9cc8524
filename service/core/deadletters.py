"""Dead letters: writes Postgres refused for good (SQLSTATE 22/23), kept with the error
until an operator retries or drops them. Used by the API and the CLI."""

from __future__ import annotations

import base64
import bisect
import logging
from collections.abc import Sequence
from typing import Any

import orjson
from arq.connections import ArqRedis

from service.adapters.arq import schedule_flush
from service.adapters.redis import AnyRedis
from service.core.redis_keys import member
from service.core.scripts import Scripts
from service.core.shards import Shards

log = logging.getLogger("wbcache.deadletters")


def _encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    if not cursor or cursor == "0":
        return ""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not a cursor this API returned") from None


class DeadLetters:
    def __init__(
        self, redis: AnyRedis, shards: Shards, scripts: Scripts, arq: ArqRedis | None = None
    ) -> None:
        self.redis = redis
        self.shards = shards
        self.scripts = scripts
        # Where the flush wake-up after a retry goes (none on a Cluster without arq).
        self.arq = arq if arq is not None else redis if isinstance(redis, ArqRedis) else None

    async def _names(self) -> list[str]:
        """Every dead-lettered member, of every shard, in key order."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in self.shards:
                pipe.hkeys(k.dead)
            per_shard: list[list[bytes]] = await pipe.execute()
        return sorted(m.decode() for names in per_shard for m in names)

    async def page(self, cursor: str = "", limit: int = 100) -> tuple[list[dict[str, Any]], str]:
        """One page of dead letters in key order, and the cursor of the next ("" when
        done). The cursor is the last key of the page, so pages never overlap or exceed
        ``limit`` (HSCAN's COUNT is only a hint)."""
        after = _decode_cursor(cursor)
        names = await self._names()
        start = bisect.bisect_right(names, after) if after else 0
        chunk = names[start : start + limit]
        values: list[bytes | None] = []
        if chunk:
            async with self.redis.pipeline(transaction=False) as pipe:
                for m in chunk:
                    pipe.hget(self.shards.for_member(m).dead, m)
                values = await pipe.execute()
        items = [orjson.loads(v) for v in values if v is not None]
        more = start + limit < len(names)
        return items, _encode_cursor(chunk[-1]) if more and chunk else ""

    async def count(self) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in self.shards:
                pipe.hlen(k.dead)
            return sum(await pipe.execute())

    async def _members(self, items: Sequence[tuple[str, str]] | None) -> list[list[str]]:
        """The members to act on, in chunks of one shard each."""
        ms = [member(c, k) for c, k in items] if items is not None else await self._names()
        chunks: list[list[str]] = []
        for group in self.shards.group(ms).values():
            chunks += [group[i : i + 500] for i in range(0, len(group), 500)]
        return chunks

    async def _act(self, action: str, items: Sequence[tuple[str, str]] | None) -> list[str]:
        done: list[str] = []
        for chunk in await self._members(items):
            k = self.shards.for_member(chunk[0])
            res = await self.scripts.dead_letters(
                keys=[
                    k.dead,
                    k.dirty,
                    k.inflight,
                    k.pending_counts,
                    k.pending_keys,
                    *(k.member_entry(m) for m in chunk),
                ],
                args=[action, *chunk],
            )
            done.extend(m.decode() for m in res)
        return done

    async def retry(self, items: Sequence[tuple[str, str]] | None) -> list[str]:
        """Put the writes back in the queue (e.g. after fixing the constraint)."""
        done = await self._act("retry", items)
        if done:
            log.info("dead letters retried: %d (%s)", len(done), ", ".join(done[:20]))
            if self.arq is not None:
                await schedule_flush(self.arq, self.shards.any, 0)
        return done

    async def drop(self, items: Sequence[tuple[str, str]] | None) -> list[str]:
        """Discard the writes and evict their cached entries: reads show Postgres' state."""
        done = await self._act("drop", items)
        if done:
            log.warning(
                "dead letters DROPPED by operator: %d (%s)", len(done), ", ".join(done[:20])
            )
        return done
