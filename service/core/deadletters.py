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
from service.core.redis_keys import Keys, member
from service.core.scripts import Scripts

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
    def __init__(self, redis: ArqRedis, keys: Keys, scripts: Scripts) -> None:
        self.redis = redis
        self.keys = keys
        self.scripts = scripts

    async def page(self, cursor: str = "", limit: int = 100) -> tuple[list[dict[str, Any]], str]:
        """One page of dead letters in key order, and the cursor of the next ("" when
        done). The cursor is the last key of the page, so pages never overlap or exceed
        ``limit`` (HSCAN's COUNT is only a hint)."""
        after = _decode_cursor(cursor)
        names = sorted(m.decode() for m in await self.redis.hkeys(self.keys.dead))  # type: ignore[misc]
        start = bisect.bisect_right(names, after) if after else 0
        chunk = names[start : start + limit]
        values = await self.redis.hmget(self.keys.dead, chunk) if chunk else []  # type: ignore[misc]
        items = [orjson.loads(v) for v in values if v is not None]
        more = start + limit < len(names)
        return items, _encode_cursor(chunk[-1]) if more and chunk else ""

    async def count(self) -> int:
        return int(await self.redis.hlen(self.keys.dead))  # type: ignore[misc]

    async def _members(self, items: Sequence[tuple[str, str]] | None) -> list[list[str]]:
        if items is not None:
            ms = [member(c, k) for c, k in items]
            return [ms[i : i + 500] for i in range(0, len(ms), 500)]
        chunks: list[list[str]] = []
        cursor = 0
        while True:
            cursor, chunk = await self.redis.hscan(self.keys.dead, cursor, count=500)
            if chunk:
                chunks.append([m.decode() for m in chunk])
            if cursor == 0:
                return chunks

    async def _act(self, action: str, items: Sequence[tuple[str, str]] | None) -> list[str]:
        done: list[str] = []
        for chunk in await self._members(items):
            res = await self.scripts.dead_letters(
                keys=[
                    self.keys.dead,
                    self.keys.dirty,
                    self.keys.inflight,
                    self.keys.pending_counts,
                    *(self.keys.member_entry(m) for m in chunk),
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
            await schedule_flush(self.redis, self.keys, 0)
        return done

    async def drop(self, items: Sequence[tuple[str, str]] | None) -> list[str]:
        """Discard the writes and evict their cached entries: reads show Postgres' state."""
        done = await self._act("drop", items)
        if done:
            log.warning(
                "dead letters DROPPED by operator: %d (%s)", len(done), ", ".join(done[:20])
            )
        return done
