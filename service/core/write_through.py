"""``Write-Mode: through``: persist one key now with the flush path (or wait for the worker
that holds it) until its version is committed, bounded by the request's timeout whatever
Redis and Postgres do."""

from __future__ import annotations

import asyncio
import enum
import logging
import time

from service.core.errors import classify
from service.core.flusher import Flusher
from service.core.redis_keys import split_member

log = logging.getLogger("wbcache.flush")


class Outcome(enum.Enum):
    """How a write-through ended."""

    COMMITTED = "committed"
    DEAD = "dead"  # dead-lettered
    TIMEOUT = "timeout"  # not committed within the timeout; still queued


class WriteThrough:
    """One per process: it keeps the tasks that outlived their request's deadline."""

    def __init__(self, flusher: Flusher) -> None:
        self.flusher = flusher
        self._late: set[asyncio.Future[Outcome]] = set()

    async def __call__(self, m: str, version: int, timeout: float) -> Outcome:
        """Persist ``m`` now (or wait for the worker that holds it) until ``version`` is
        committed, for at most ``timeout`` seconds whatever Redis and Postgres do."""
        task = asyncio.ensure_future(self._run(m, version, time.monotonic() + timeout))
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            return task.result()
        # Out of time (e.g. Redis stopped answering after the commit): the write stays
        # queued; what the task holds is handed back in the background or its lease runs out.
        task.cancel()
        self._late.add(task)
        task.add_done_callback(self._forget)
        return Outcome.TIMEOUT

    def _forget(self, task: asyncio.Future[Outcome]) -> None:
        self._late.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("write-through ended after its deadline: %s", task.exception())

    async def _run(self, m: str, version: int, deadline: float) -> Outcome:
        keys = self.flusher.shards.for_member(m)
        entry = keys.entry(*split_member(m))
        claimed = False
        delay = 0.002
        while True:
            try:
                if not claimed:
                    claimed = True
                    batch = await self.flusher.claim([m])
                    if batch is not None:
                        # Handed back at the deadline or not: a worker may still commit it.
                        await self.flusher.flush_batch(batch, deadline)
                state = await self.flusher.scripts.committed(
                    keys=[entry, keys.dirty, keys.inflight, keys.dead], args=[m, version]
                )
                if state == 1:
                    return Outcome.COMMITTED
                if state == -1:
                    return Outcome.DEAD
            except Exception as exc:
                # The write is accepted and queued: a dependency failing now only means we
                # cannot confirm the commit (yet).
                if classify(exc) is None:
                    raise
            if time.monotonic() + delay > deadline:
                return Outcome.TIMEOUT
            await asyncio.sleep(delay)
            delay = min(0.05, delay * 2)
