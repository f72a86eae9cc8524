"""The flush path: claim a batch of dirty keys under a lease, persist it with one guarded
statement per kind, release it. Used by the worker (continuously) and by the API for
``Write-Mode: through`` (one key), so there is one copy of this logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence

import asyncpg
import orjson

from service.adapters.postgres import PgPool
from service.adapters.redis import AnyRedis
from service.config import Settings
from service.core import histograms, repository
from service.core.claimed_batch import Batch, DeadLetter, Item, decode_claim
from service.core.errors import classify, is_poison, sqlstate
from service.core.key_filter import KeyFilter
from service.core.queue_heads import clock_and_heads
from service.core.redis_keys import Keys
from service.core.scripts import Scripts
from service.core.shards import Shards
from service.core.throttled_log import ThrottledLog

log = logging.getLogger("wbcache.flush")

# An unexpected error (a bug, not a dependency failing) is retried this many times, with
# backoff, before the batch is split to dead-letter the writes that trigger it.
BUG_RETRIES = 3
# Batches whose lease ran out that one claim takes over (the next claims take the rest).
_TAKE_OVER_MAX = 16
# A worker that has not beaten for this long is dropped from the workers set.
_WORKER_FORGOTTEN_MS = 3_600_000
# How often one claim reads its candidates again when all of them had gone by the time it
# claimed them (another worker took them between the two steps).
_CLAIM_ROUNDS = 8


def now_ms() -> int:
    """This process' wall clock, for what people read (a dead letter's ``failed_at``). Never
    compared with a time from another process: those all come from Redis ``TIME``."""
    return int(time.time() * 1000)


def _remaining(deadline: float | None) -> float | None:
    """Seconds left before ``deadline`` (monotonic clock), for ``asyncio.timeout``."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class Flusher:
    def __init__(self, redis: AnyRedis, pg: PgPool, settings: Settings, scripts: Scripts) -> None:
        self.redis = redis
        self.pg = pg
        self.settings = settings
        self.shards = Shards.from_settings(settings)
        # The keys of shard 0, which are also the keys no shard owns (workers, last error).
        self.keys: Keys = self.shards.any
        self.scripts = scripts
        self.key_filter = KeyFilter.from_settings(settings)
        self.held: set[str] = set()
        self._shard_of_batch: dict[str, int] = {}
        # Claims start at the shard after the last one claimed from, so every shard's
        # queue is served in turn however busy the others are.
        self._next_shard = 0
        self._claiming = asyncio.Lock()
        # Set on shutdown: loops stop claiming; held batches are handed back.
        self.stopping = False
        self._retry_log = ThrottledLog(log)
        # Write-throughs past their deadline, finishing (handing back) in the background.

    # -- claiming and releasing ------------------------------------------------------------

    async def claim(self, members: Sequence[str] = ()) -> Batch | None:
        """Claim a batch under a lease: the dirty keys that are due, oldest first, of the
        next shard in turn that has any, or ``members`` (those that are dirty, due or not;
        all of one shard), after taking over batches whose lease ran out."""
        if members:
            groups = self.shards.group(dict.fromkeys(members))
            if len(groups) != 1:
                raise ValueError("an explicit claim takes members of one shard")
            ((shard, group),) = groups.items()
            return await self._claim_shard(shard, [m.encode() for m in group])
        # One claim at a time in this process: loops that read candidates together would
        # read the same ones, and all but one claim would come back empty (a script over
        # BATCH_SIZE keys, for nothing). Claims are Redis' work, one at a time anyway.
        async with self._claiming:
            count = self.shards.count
            order = [(self._next_shard + i) % count for i in range(count)]
            if count > 1:
                busy = set(await self._shards_with_work())
                order = [s for s in order if s in busy]
            for shard in order:
                batch = await self._claim_shard(shard, [])
                if batch is not None:
                    self._next_shard = (shard + 1) % count
                    return batch
            return None

    async def _shards_with_work(self) -> list[int]:
        """The shards with a due dirty key or a lease run out, in one round trip (per
        node, on a Cluster): the claim scripts check again, atomically; this only spares
        a claim's round trips to idle shards."""
        now, firsts = await clock_and_heads(self.redis, self.shards, with_leases=True)
        due = now - self.settings.write_delay_ms
        busy = []
        for shard in range(self.shards.count):
            dirty, leases = firsts[2 * shard], firsts[2 * shard + 1]
            if (dirty and dirty[0][1] <= due) or (leases and leases[0][1] <= now):
                busy.append(shard)
        return busy

    async def _claim_shard(self, shard: int, explicit: list[bytes]) -> Batch | None:
        """``claim`` in one shard. Every key a script touches is declared (Redis Cluster
        routes a script by its KEYS), so a claim reads its candidates first (candidates.lua,
        read only), and claim.lua then checks each again, atomically (still dirty? due?),
        and takes it."""
        for _ in range(_CLAIM_ROUNDS):
            expired, due = await self._candidates(shard, due=not explicit)
            if expired:
                await self._take_over(shard, expired)
                if not explicit:
                    continue  # their keys are dirty again, and may be due: read again
            candidates = explicit or due
            if not candidates:
                return None
            batch = await self._claim(shard, candidates, explicit=bool(explicit))
            if batch is not None or explicit:
                return batch
            # Every candidate had gone by the claim (another worker took it between the two
            # steps, or its entry was gone and the claim dropped its mark): read again.
        return None

    async def _candidates(self, shard: int, due: bool) -> tuple[list[bytes], list[bytes]]:
        """(batch ids whose lease ran out, due dirty members oldest first), on Redis' clock."""
        k = self.shards[shard]
        expired, ready = await self.scripts.candidates(
            keys=[k.dirty, k.leases],
            args=[
                self.settings.write_delay_ms if due else "",
                self.settings.batch_size,
                _TAKE_OVER_MAX,
            ],
        )
        return expired, ready

    async def _take_over(self, shard: int, batch_ids: Sequence[bytes]) -> None:
        k = self.shards[shard]
        await self.scripts.take_over(
            keys=[
                k.dirty,
                k.inflight,
                k.leases,
                k.batch_age,
                k.pending_counts,
                *(k.batch(b.decode()) for b in batch_ids),
            ],
            args=batch_ids,
        )

    async def _claim(self, shard: int, candidates: Sequence[bytes], explicit: bool) -> Batch | None:
        batch_id = uuid.uuid4().hex
        k = self.shards[shard]
        entry_prefix = k.entry_prefix.encode()
        call = asyncio.ensure_future(
            self.scripts.claim(
                keys=[
                    k.dirty,
                    k.inflight,
                    k.leases,
                    k.batch_age,
                    k.pending_counts,
                    k.batch(batch_id),
                    *(entry_prefix + m for m in candidates),
                ],
                args=[
                    "" if explicit else self.settings.write_delay_ms,
                    32 * 1024 * 1024,
                    batch_id,
                    self._lease_ms,
                    len(entry_prefix),
                ],
            )
        )
        try:
            raw = await asyncio.shield(call)
        except asyncio.CancelledError:
            # The script runs atomically in Redis: learn what it claimed and hand it back
            # now, rather than leave it held until the lease runs out.
            with contextlib.suppress(Exception):
                raw = await call
                if raw:
                    await self.release(Batch(batch_id, decode_claim(raw), shard), [], [])
            raise
        if not raw:
            return None
        self.held.add(batch_id)
        self._shard_of_batch[batch_id] = shard
        return Batch(batch_id, decode_claim(raw), shard)

    async def hand_back_all(self) -> None:
        """Return every batch this process still holds to the dirty set (shutdown)."""
        for batch_id in list(self.held):
            await self.release(Batch(batch_id, [], self._shard_of_batch.get(batch_id, 0)), [], [])

    async def release(
        self, batch: Batch, committed: Sequence[Item], dead: Sequence[DeadLetter]
    ) -> None:
        k = self.shards[batch.shard]
        now = now_ms()
        # The entries of the committed, then the dead-lettered members, in ARGV's order.
        keys = [
            k.dirty,
            k.inflight,
            k.leases,
            k.batch_age,
            k.dead,
            k.counters,
            k.flush_log,
            k.pending_counts,
            k.batch(batch.id),
            k.pending_keys,
        ]
        # The committed puts, then the committed deletes: release.lua gives each its TTL
        # from that, without reading what the worker already knows.
        # Each member is the end of its entry's key: release.lua reads it from there.
        puts = [i for i in committed if i.document is not None]
        deletes = [i for i in committed if i.document is None]
        prefix = k.entry_prefix
        args: list[str | int | bytes] = [
            batch.id,
            self.settings.clean_ttl_seconds * 1000,
            self.settings.tombstone_ttl_seconds * 1000,
            len(puts),
            len(deletes),
            len(prefix.encode()),
        ]
        keys += [prefix + i.member for i in puts]
        keys += [prefix + i.member for i in deletes]
        args += [i.version for i in puts]
        args += [i.version for i in deletes]
        for d in dead:
            info = {
                "collection": d.item.collection,
                "key": d.item.key,
                "version": int(d.item.version),
                "sqlstate": d.sqlstate,
                "error": d.error,
                "failed_at": now / 1000,
            }
            keys.append(k.member_entry(d.item.member))
            args += [d.item.version, orjson.dumps(info)]
        await self.scripts.release(keys=keys, args=args)
        self.held.discard(batch.id)
        self._shard_of_batch.pop(batch.id, None)

    async def renew_leases(self, worker_id: str = "") -> None:
        """Keep the leases of batches this process holds (a slow Postgres is not a death),
        one script per shard holding any, and, given a worker id, its heartbeat: scripts
        on Redis' clock, which Redis runs even at maxmemory (a worker draining a full Redis
        must not lose its batches)."""
        by_shard: dict[int, list[str]] = {}
        for batch_id in list(self.held):
            by_shard.setdefault(self._shard_of_batch.get(batch_id, 0), []).append(batch_id)
        for shard, batch_ids in by_shard.items():
            await self.scripts.heartbeat(
                keys=[self.shards[shard].leases], args=["XX", self._lease_ms, "", *batch_ids]
            )
        if worker_id:
            await self.scripts.heartbeat(
                keys=[self.keys.workers], args=["", 0, _WORKER_FORGOTTEN_MS, worker_id]
            )

    @property
    def _lease_ms(self) -> int:
        return int(self.settings.lease_seconds * 1000)

    # -- persisting ------------------------------------------------------------------------

    async def _persist(
        self, conn: asyncpg.Connection, items: list[Item], isolate_bugs: bool = False
    ) -> tuple[list[Item], list[DeadLetter]]:
        """Persist ``items``; isolate writes Postgres will never take by splitting. With
        ``isolate_bugs``, an unexpected error (ours, not a dependency's) is isolated the same
        way, so the write that triggers it is dead-lettered and the others are persisted."""
        try:
            upserts = repository.Columns()
            deletes = repository.Columns()
            for i in items:
                collection, _, key = i.member.partition(":")
                if i.document is None:
                    deletes.add(collection, key, None, int(i.version))
                else:
                    upserts.add(collection, key, i.document.decode(), int(i.version))
            await repository.persist(conn, upserts, deletes)
            return items, []
        except Exception as exc:
            poison = is_poison(exc)
            if not poison and not (isolate_bugs and classify(exc, "postgres") is None):
                raise
            if len(items) == 1:
                item = items[0]
                if poison:
                    log.error(
                        "dead-lettered %s version %s: %s %s",
                        item.member,
                        item.version,
                        sqlstate(exc),
                        exc,
                    )
                    return [], [DeadLetter(item, sqlstate(exc), str(exc))]
                log.error(
                    "dead-lettered %s version %s: unexpected error (a bug?)",
                    item.member,
                    item.version,
                    exc_info=exc,
                )
                return [], [DeadLetter(item, None, f"{type(exc).__name__}: {exc}")]
        half = len(items) // 2
        ok1, dead1 = await self._persist(conn, items[:half], isolate_bugs)
        ok2, dead2 = await self._persist(conn, items[half:], isolate_bugs)
        return ok1 + ok2, dead1 + dead2

    async def persist_once(
        self, batch: Batch, isolate_bugs: bool = False
    ) -> tuple[list[Item], list[DeadLetter]]:
        pool = await self.pg.get()
        async with pool.acquire() as conn:
            return await self._persist(conn, batch.items, isolate_bugs)

    async def flush_batch(self, batch: Batch, deadline: float | None = None) -> bool:
        """Persist and release ``batch``. Failures of a dependency (``classify``) are
        retried with backoff forever, or until ``deadline`` on the monotonic clock; an
        unexpected error (a bug) is retried BUG_RETRIES times, then the batch is split so
        the writes that trigger it are dead-lettered with the error and the rest persisted.
        Returns False if the batch was handed back (or, past the commit, left to its lease)."""
        attempt = 0
        bugs = 0
        started = time.monotonic()
        try:
            while True:
                try:
                    committed, dead = await self.persist_once(batch, bugs > BUG_RETRIES)
                    break
                except Exception as exc:
                    attempt += 1
                    bug = classify(exc, "postgres") is None
                    if bug:
                        bugs += 1
                    delay = min(self.settings.retry_backoff_max_seconds, 0.05 * 2**attempt)
                    give_up = deadline is not None and time.monotonic() + delay > deadline
                    await self._note_failure(exc, retrying=not give_up, bug=bug)
                    if give_up:
                        await self._hand_back(batch, deadline)
                        return False
                    await asyncio.sleep(delay)
            if not await self._release_reliably(batch, committed, dead, deadline):
                return False
        except asyncio.CancelledError:
            # Shutting down, a write-through out of time, or another loop of the TaskGroup
            # failed: hand the batch back so another worker takes it at once. If Redis
            # cannot take it now, nobody flushes it any more: it leaves ``held``, so the
            # heartbeat stops renewing its lease, which runs out, and a claim takes it over
            # (kept in ``held``, the live worker's heartbeat kept it leased for ever).
            try:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.release(batch, [], []))
            finally:
                self.held.discard(batch.id)
            raise
        duration = time.monotonic() - started
        try:
            counters = self.shards[batch.shard].counters
            async with self.redis.pipeline(transaction=False) as pipe:
                histograms.observe(pipe, counters, "flush_batch_size", len(batch.items))
                histograms.observe(pipe, counters, "flush_duration_seconds", duration)
                await pipe.execute()
        except Exception as exc:  # metrics must never fail a flush
            log.debug("could not record flush metrics: %s", exc)
        if attempt:
            log.info("flush recovered after %d retries", attempt)
        log.info(
            "flushed batch=%s size=%d committed=%d dead=%d duration_ms=%.1f",
            batch.id[:8],
            len(batch.items),
            len(committed),
            len(dead),
            duration * 1000,
        )
        return True

    async def _hand_back(self, batch: Batch, deadline: float | None) -> None:
        """Return an unpersisted batch to the dirty set; if Redis cannot take it before
        ``deadline``, leave it to its lease."""
        try:
            async with asyncio.timeout(_remaining(deadline)):
                await self.release(batch, [], [])
        except Exception as exc:
            if classify(exc) is None and not isinstance(exc, TimeoutError):
                raise
            self.held.discard(batch.id)
            log.warning("could not hand back batch %s (%s); its lease will run out", batch.id, exc)

    async def _release_reliably(
        self,
        batch: Batch,
        committed: Sequence[Item],
        dead: Sequence[DeadLetter],
        deadline: float | None = None,
    ) -> bool:
        """The commit is done: retry the release through a Redis outage. Give up when
        shutting down or at ``deadline`` (False); the lease then runs out and the
        (idempotent) flush is redone."""
        delay = 0.05
        while True:
            try:
                async with asyncio.timeout(_remaining(deadline)):
                    await self.release(batch, committed, dead)
                return True
            except Exception as exc:
                if classify(exc) is None and not isinstance(exc, TimeoutError):
                    raise
                out_of_time = deadline is not None and time.monotonic() + delay > deadline
                if self.stopping or out_of_time:
                    self.held.discard(batch.id)
                    log.warning(
                        "committed batch %s not released (%s); its lease will run out",
                        batch.id,
                        exc,
                    )
                    return False
                self._retry_log.warn("release failed, retrying: %s", exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)

    async def _note_failure(self, exc: BaseException, retrying: bool, bug: bool) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if bug:
            log.error("flush failed with an unexpected error (a bug?)", exc_info=exc)
        else:
            self._retry_log.warn("flush failed, retrying with backoff: %s", text)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(self.keys.counters, "flush_failures", 1)
                if retrying:
                    pipe.hincrby(self.keys.counters, "flush_retries", 1)
                pipe.set(self.keys.last_error, orjson.dumps({"error": text, "at": time.time()}))
                await pipe.execute()
        except Exception:  # Redis trouble is reported by its own callers
            pass

    # -- draining ----------------------------------------------------------------------

    async def drain_ready(self) -> int:
        """Flush every batch that is ready now, ``flush_concurrency`` at a time."""
        flushed = 0

        async def loop() -> None:
            nonlocal flushed
            while not self.stopping:
                batch = await self.claim()
                if batch is None:
                    return
                await self.flush_batch(batch)
                flushed += len(batch.items)

        # A TaskGroup: if one loop fails (Redis gone), the others are cancelled and hand
        # their batches back, instead of running on unowned.
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, self.settings.flush_concurrency)):
                group.create_task(loop())
        return flushed

    async def next_ready_in_ms(self) -> int | None:
        """Milliseconds until the oldest dirty key is due, or None if nothing is dirty."""
        now, firsts = await clock_and_heads(self.redis, self.shards, with_leases=False)
        oldest = [int(first[0][1]) for first in firsts if first]
        if not oldest:
            return None
        # Dirty marks are Redis-clock ms (write.lua): compare them with Redis' clock.
        due = min(oldest) + self.settings.write_delay_ms
        return max(0, due - now)
