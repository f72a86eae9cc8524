"""The write-behind core as the API sees it: writes through one Lua script, cache-aside
reads with a guarded fill, invalidation. Postgres is only read here (on misses)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from arq.connections import ArqRedis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, ResponseError

from service.adapters.arq import schedule_flush
from service.adapters.postgres import PgPool
from service.adapters.redis import AnyRedis
from service.adapters.redis_mux import RedisMux
from service.config import Settings
from service.core import documents, repository
from service.core.errors import ReplicasUnconfirmed, Unavailable, classify
from service.core.key_filter import KeyFilter
from service.core.purge import PurgeQueue, collection_member, record_member
from service.core.record_types import (
    Op,
    Preconditions,
    ReadOutcome,
    Record,
    Status,
    WriteCall,
    WriteOutcome,
    WriteResult,
)
from service.core.redis_keys import member
from service.core.script_pipeline import pipelined_scripts, replicas_confirmed
from service.core.scripts import Scripts
from service.core.shards import Shards
from service.core.write_commands import Command, WriteCommands, reply_text, write_outcome

log = logging.getLogger("wbcache.records")


_T = TypeVar("_T")


def _own(outcome: _T | BaseException) -> _T | Exception:
    """A gathered outcome kept as that call's own; cancellation is nobody's outcome."""
    if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
        raise outcome
    return outcome


# What a read takes from an entry: version, document, tombstone flag, dead-letter flag.
_READ_FIELDS = ["v", "d", "t", "x"]


def _cached_record(v: bytes, d: bytes | None, t: bytes | None, x: bytes | None) -> Record:
    return Record(int(v), None if t == b"1" else d, hit=True, dead_lettered=x == b"1")


class RecordStore:
    def __init__(
        self,
        redis: AnyRedis,
        pg: PgPool,
        settings: Settings,
        scripts: Scripts,
        on_hit: Callable[[bool], None] | None = None,
        arq: ArqRedis | None = None,
        mux: RedisMux | None = None,
    ) -> None:
        self.redis = redis
        # The single-key write and read share one connection (auto-pipelined) when given.
        self.mux = mux
        self.pg = pg
        self.settings = settings
        self.shards = Shards.from_settings(settings)
        self.key_filter = KeyFilter.from_settings(settings)
        self.commands = WriteCommands(settings, self.shards, self.key_filter)
        # Where flush wake-ups are enqueued: REDIS_URL's own client, except on a Cluster
        # (ARQ_REDIS_URL's, or none: workers poll).
        self.arq = arq if arq is not None else redis if isinstance(redis, ArqRedis) else None
        self.scripts = scripts
        self._loads: dict[str, asyncio.Future[Record]] = {}
        self._on_hit = on_hit
        # REDIS_MIN_REPLICAS: each write is followed by a WAIT in its round trip. At 0 the
        # write path is one EVALSHA, exactly as without the feature.
        self._replicas = settings.redis_min_replicas
        # Public collections' writes queue edge purges (none unless EDGE_PURGE_URLS is set:
        # then the write path is exactly as without edges).
        self._purged = settings.purged_collections
        self.purges = PurgeQueue(redis, self.shards, scripts)

    # -- Postgres -------------------------------------------------------------------------

    async def _fetch(
        self, collection: str, key: str, filtered: bool = True
    ) -> repository.StoredRow:
        """Postgres' row of a key that is not cached, unless the key filter (when
        ``filtered``) says it has never been written: then no row, without a query."""
        if filtered and await self._never_written(collection, key):
            return repository.StoredRow(None, 0)
        try:
            pool = await self.pg.get()
            return await repository.fetch(pool, collection, key)
        except Exception as exc:
            # Classified here, not at the edge: a blind PUT goes on without Postgres.
            unavailable = classify(exc, talking_to="postgres")
            if unavailable is None:
                raise
            raise unavailable from exc

    async def _never_written(self, collection: str, key: str) -> bool:
        """Whether the key filter (complete, and completed on this server) lacks one of
        the key's bits."""
        if not self.key_filter.enabled or self.mux is None:
            return False
        m = member(collection, key)
        k = self.shards.for_member(m)
        keys = [self.key_filter.key(k), self.key_filter.origin(k)]
        answer = await self._mux_script(
            self.scripts.key_filter_check,
            lambda run_id: (keys, self.key_filter.script_args(m, run_id)),
        )
        return bool(answer)

    # -- writes ---------------------------------------------------------------------------

    async def _call_write(self, call: WriteCall) -> list[Any]:
        """The write script's reply; with REDIS_MIN_REPLICAS, followed by WAIT's count of
        the replicas that hold the write (both in one round trip). Through the shared
        connection when there is one: then the key filter can be trusted (its run_id)."""
        if self._replicas:
            return await self._call_write_waited(self.commands.one(call))
        if self.mux is None:
            keys, args = self.commands.one(call)
            result: list[Any] = await self.scripts.write(keys=keys, args=args)
            return result
        reply: list[Any] = await self._mux_script(
            self.scripts.write, lambda run_id: self.commands.one(call, run_id)
        )
        return reply

    async def _mux_script(self, script: AsyncScript, command: Callable[[str], Command]) -> Any:
        """``script`` through the shared connection, its keys and arguments built for the
        server it goes to (``RedisMux.execute_bound``); loaded first if Redis lost it."""
        assert self.mux is not None

        def evalsha(run_id: str) -> list[Any]:
            keys, args = command(run_id)
            return ["EVALSHA", script.sha, len(keys), *keys, *args]

        try:
            return await self.mux.execute_bound(evalsha)
        except NoScriptError:  # Redis restarted (or flushed its scripts): load it, again
            await self.redis.script_load(script.script)
            return await self.mux.execute_bound(evalsha)

    async def _call_write_waited(self, command: Command) -> list[Any]:
        """EVALSHA then WAIT, one pipeline. NOSCRIPT (Redis restarted): load the script and
        send both again; WAIT after a script that did not run waits for nothing new."""
        for _ in range(2):
            (reply,), (ack,) = await self._pipelined(self.scripts.write, [command])
            if not isinstance(reply, NoScriptError):
                break
            await self.redis.script_load(self.scripts.write.script)
        if isinstance(reply, Exception):
            raise reply
        return [*reply, ack]

    def _confirm(self, result: WriteResult, ack: Any) -> WriteOutcome:
        """``result``, unless it wrote (OK) and fewer than REDIS_MIN_REPLICAS replicas
        confirmed it: then ReplicasUnconfirmed (the primary has the write)."""
        if result.status is not Status.OK:
            return result  # it wrote nothing: nothing to replicate
        confirmed = replicas_confirmed(ack)
        if confirmed >= self._replicas:
            return result
        return ReplicasUnconfirmed(
            result.version, confirmed, self._replicas, self.settings.redis_replica_timeout_ms
        )

    async def write_many(self, calls: Sequence[WriteCall]) -> list[WriteOutcome]:
        """Writes to distinct keys in one round trip: per shard, one call of
        write_many.lua (write.lua once per write, in order). A key that is not cached
        needs Postgres' version floor first, so it then takes the single-key path
        (``write``); so do the writes of a call that found its script missing (a Redis
        restart), which is loaded again for the next batch.

        One outcome per call, in order: its result, or the exception that stopped that
        call alone (Postgres down for an uncached key's precondition, a Redis error reply
        to one of its commands); the other calls are applied all the same. Only a failure
        of the pipeline itself (Redis unreachable) raises: then no call's fate is known."""
        if not calls:
            return []
        groups, commands = self.commands.many(calls)
        if self.mux is not None and not self._replicas:
            raws, acks = await self._mux_write_many(commands), [None] * len(commands)
        else:
            raws, acks = await self._pipelined(self.scripts.write_many, commands)
        outcomes: list[WriteOutcome | None] = [None] * len(calls)
        single: list[int] = []
        wake = reload = False
        for group, raw, ack in zip(groups, raws, acks, strict=True):
            if isinstance(raw, NoScriptError):
                single += group
                reload = True
                continue
            # The script's own error reply (refused before it ran) stands for each write.
            replies = [raw] * len(group) if isinstance(raw, Exception) else raw
            for i, one in zip(group, replies, strict=True):
                if isinstance(one, Exception):
                    outcomes[i] = one  # an error reply to one of this write's commands
                    continue
                if one[0] == b"OK":  # the common reply, read without decoding each field
                    result: WriteResult = WriteResult(Status.OK, int(one[1]), one[2] == b"1")
                    wake = wake or one[3] == b"1"
                elif (reply := write_outcome(one)) is None:
                    single.append(i)
                    continue
                else:
                    result = reply[0]
                outcomes[i] = self._confirm(result, ack) if self._replicas else result
        if reload:
            with contextlib.suppress(Exception):  # the single-key path does not need it
                await self.redis.script_load(self.scripts.write_many.script)
        if wake:
            await self._wake()
        if self._purged:
            await self._queue_purges(calls, outcomes)
        if single:
            done = await asyncio.gather(
                *(self.write(calls[i]) for i in single), return_exceptions=True
            )
            for i, outcome in zip(single, done, strict=True):
                outcomes[i] = _own(outcome)
        return [o for o in outcomes if o is not None]

    async def _queue_purges(
        self, calls: Sequence[WriteCall], outcomes: Sequence[WriteOutcome | None]
    ) -> None:
        """The edge purges of a batch's applied writes to public collections, queued before
        the batch is answered (write_many.lua leaves them to this, one more round trip;
        the writes that take the single-key path queue their own in write.lua)."""
        members = [
            record_member(call.collection, call.key)
            for call, outcome in zip(calls, outcomes, strict=True)
            if call.collection in self._purged
            and isinstance(outcome, WriteResult)
            and outcome.status is Status.OK
        ]
        if members:
            await self.purges.add(members)

    async def _mux_write_many(self, commands: Sequence[Command]) -> list[Any]:
        """write_many.lua's calls through the shared connection, each given the run_id of
        the server it is written to (``WriteCommands.with_run_id``), so that the key
        filter is trusted there as on the single-key path: a write to a key the filter has
        never seen is then a create at version 0, with no Postgres read. Error replies
        come back in place, as from ``pipelined_scripts``; a failure of the connection
        raises."""
        raws = await asyncio.gather(
            *(
                self._mux_script(
                    self.scripts.write_many,
                    functools.partial(self.commands.with_run_id, c),
                )
                for c in commands
            ),
            return_exceptions=True,
        )
        for raw in raws:
            if isinstance(raw, BaseException) and not isinstance(raw, ResponseError):
                raise raw
        return raws

    async def _pipelined(
        self, script: AsyncScript, commands: Sequence[Command]
    ) -> tuple[list[Any], list[Any]]:
        """``pipelined_scripts`` on this store's Redis, with its REDIS_MIN_REPLICAS."""
        return await pipelined_scripts(
            self.redis, script, commands, self._replicas, self.settings.redis_replica_timeout_ms
        )

    async def write(self, call: WriteCall) -> WriteResult:
        """One atomic write. If the key is not cached, Postgres supplies the version floor
        (and existence, for preconditions) and the script runs again. With
        REDIS_MIN_REPLICAS, raises ReplicasUnconfirmed for a write the primary applied but
        too few replicas confirmed in time (it is queued all the same)."""
        raw = await self._call_write(call)
        reply = write_outcome(raw)
        if reply is None:
            try:
                # The script found no answer in the filter: Postgres must give one.
                stored = await self._fetch(call.collection, call.key, filtered=False)
            except Unavailable:
                # A blind PUT needs no history: Redis' clock alone keeps versions above
                # Postgres', so accept it while Postgres is down.
                pre = call.pre
                if call.op is not Op.PUT or pre.if_match or pre.if_none_match:
                    raise
                stored = repository.StoredRow(None, 0)
            call = replace(call, stored=stored)
            raw = await self._call_write(call)
            reply = write_outcome(raw)
            if reply is None:  # the script answers MISS only when not given the row
                raise AssertionError("the write script answered MISS with the row given")
        result, schedule = reply
        if schedule:
            await self._wake()
        if self._replicas:
            confirmed = self._confirm(result, raw[-1])
            if isinstance(confirmed, Exception):
                raise confirmed
        return result

    async def _wake(self) -> None:
        if self.arq is None:
            return  # a Cluster without ARQ_REDIS_URL: workers poll the shards
        try:
            await schedule_flush(self.arq, self.shards.any, self.settings.write_delay_ms)
        except Exception as exc:  # the sweep catches what a lost wake-up misses
            log.warning("could not enqueue a flush wake-up: %s", exc)

    async def patch(
        self, collection: str, key: str, patch: Any, pre: Preconditions, force: bool = False
    ) -> tuple[WriteResult, bytes | None]:
        """Read, merge in Python, write with a version compare-and-set; retry on conflict."""
        for _ in range(50):
            current = await self.read(collection, key, fill=False)
            if current.document is None:
                return WriteResult(Status.NOT_FOUND), None
            merged = documents.merge_patch(documents.loads(current.document), patch)
            body = documents.canonical(merged, self.settings.max_document_bytes)
            stored = None
            if not current.hit:
                stored = repository.StoredRow(current.document.decode(), current.version)
            result = await self.write(
                WriteCall(
                    Op.PATCH,
                    collection,
                    key,
                    body,
                    pre,
                    expect=current.version,
                    stored=stored,
                    force=force,
                )
            )
            if result.status is not Status.CONFLICT:
                return result, body
        raise Unavailable("redis", "too many concurrent patches of this key; retry")

    # -- reads ----------------------------------------------------------------------------

    async def read(self, collection: str, key: str, fill: bool = True) -> Record:
        entry = self.shards.for_record(collection, key).entry(collection, key)
        if self.mux is None:
            v, d, t, x = await self.redis.hmget(entry, _READ_FIELDS)  # type: ignore[misc]
        else:
            v, d, t, x = await self.mux.execute("HMGET", entry, *_READ_FIELDS)
        if v is not None:
            if fill and self._on_hit:
                self._on_hit(True)
            return _cached_record(v, d, t, x)
        if not fill:
            row = await self._fetch(collection, key)
            doc = documents.from_postgres(row.value) if row.value is not None else None
            return Record(row.version, doc, hit=False)
        if self._on_hit:
            self._on_hit(False)
        return await self._load_once(collection, key)

    async def read_many(self, names: Sequence[tuple[str, str]]) -> list[ReadOutcome]:
        """Reads of several keys: the cached ones in one round trip (a pipeline of HMGET),
        the others through the cache-aside path of ``read``. One outcome per name: its
        record, or the exception that stopped its read alone (Postgres down for a miss)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for collection, key in names:
                pipe.hmget(
                    self.shards.for_record(collection, key).entry(collection, key), _READ_FIELDS
                )
            rows: list[list[Any]] = await pipe.execute()
        outcomes: list[ReadOutcome | None] = [None] * len(names)
        misses: list[int] = []
        for i, (v, d, t, x) in enumerate(rows):
            if v is None:
                misses.append(i)
                continue
            if self._on_hit:
                self._on_hit(True)
            outcomes[i] = _cached_record(v, d, t, x)
        loaded = await asyncio.gather(
            *(self.read(*names[i]) for i in misses), return_exceptions=True
        )
        for i, outcome in zip(misses, loaded, strict=True):
            outcomes[i] = _own(outcome)
        return [o for o in outcomes if o is not None]

    async def _load_once(self, collection: str, key: str) -> Record:
        """Concurrent misses of one key in this process share one Postgres read."""
        m = member(collection, key)
        pending = self._loads.get(m)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Record] = asyncio.get_running_loop().create_future()
        self._loads[m] = fut
        try:
            record = await self._load(collection, key)
            fut.set_result(record)
            return record
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: waiters re-raise it, nobody else must
            raise
        finally:
            del self._loads[m]

    async def _load(self, collection: str, key: str) -> Record:
        row = await self._fetch(collection, key)
        doc = documents.from_postgres(row.value) if row.value is not None else None
        ttl = (
            self.settings.clean_ttl_seconds
            if doc is not None
            else self.settings.negative_ttl_seconds
        )
        k = self.shards.for_record(collection, key)
        try:
            installed = await self.scripts.fill(
                keys=[k.entry(collection, key), k.floor(collection, key)],
                args=[row.version, doc or b"", "1" if doc is None else "0", ttl * 1000],
            )
        except ResponseError as exc:
            # Redis at maxmemory refuses the fill, a cache optimisation: the row is still
            # the answer (no entry means no pending write), unless a write landed meanwhile.
            refused = classify(exc)
            if refused is None or refused.code != "redis_full":
                raise
            installed = False
        if not installed:
            # Something newer reached the cache meanwhile (a write, a delete): use it.
            v, d, t = await self.redis.hmget(  # type: ignore[misc]
                k.entry(collection, key), ["v", "d", "t"]
            )
            if v is not None:
                return Record(int(v), None if t == b"1" else d, hit=False)
        return Record(row.version, doc, hit=False)

    # -- invalidation ---------------------------------------------------------------------

    async def invalidate(self, collection: str, keys: list[str] | None) -> tuple[int, int]:
        """Drop clean cached copies (never a pending write); returns (dropped, skipped)."""
        floor_ttl = max(60_000, int(self.settings.pg_timeout_seconds * 4000))
        dropped = skipped = 0

        async def run(members: list[str]) -> None:
            # One script per shard: a script's keys live in one slot.
            nonlocal dropped, skipped
            for shard, group in self.shards.group(members).items():
                k = self.shards[shard]
                names = [k.dirty, k.inflight, k.dead]
                for m in group:
                    names += [k.member_entry(m), k.member_floor(m)]
                res = await self.scripts.invalidate(keys=names, args=[floor_ttl, *group])
                dropped += int(res[0])
                skipped += int(res[1])

        if keys is not None:
            for i in range(0, len(keys), 500):
                await run([member(collection, key) for key in keys[i : i + 500]])
        else:
            chunk: list[str] = []
            async for raw in self.redis.scan_iter(
                match=self.shards.entries_pattern(collection), count=1000
            ):
                m = self.shards.member_of_entry(reply_text(raw))
                if m is not None:
                    chunk.append(m)
                if len(chunk) >= 500:
                    await run(chunk)
                    chunk = []
            if chunk:
                await run(chunk)
        if self.settings.purges_edges:
            # Any collection: one that was public until a restart may still be at the edge.
            if keys is None:
                await self.purges.add([collection_member(collection)])
            else:
                await self.purges.add(record_member(collection, key) for key in keys)
        return dropped, skipped
