"""Memcached item operations on the record store: the same write script, preconditions and
versions as HTTP (service/core/records.py), with memcached's outcomes.

Atomicity: ``set``/``add``/``replace``/``cas``/``delete`` are one run of the write script
(``add`` is If-None-Match: *, ``replace`` If-Match: *, ``cas`` If-Match: <cas unique>).
``incr``/``decr``/``append``/``prepend`` read the record, compute the new value and write it
with the write script's compare-and-set on the version read (``WriteCall.expect``, the
one a JSON merge patch uses), retrying on conflict: a write lands only if no other write
came between its read and itself, and versions only grow, so no interleaving is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from enum import Enum

from service.api.memcached import values
from service.config import Settings
from service.core import repository
from service.core.errors import Unavailable
from service.core.record_types import (
    Match,
    Op,
    Preconditions,
    Record,
    Status,
    WriteCall,
    WriteResult,
)
from service.core.records import RecordStore
from service.core.redis_keys import member
from service.core.write_through import Outcome as Persisted
from service.core.write_through import WriteThrough

log = logging.getLogger("wbcache.memcached")

_ANY = Match(any=True)
_CAS_RETRIES = 50
_MAX_U64 = 2**64 - 1
# protocol.txt, "Expiration times": past 30 days an exptime is a Unix time.
_RELATIVE_LIMIT = 60 * 60 * 24 * 30


class Mode(Enum):
    SET = "set"
    ADD = "add"
    REPLACE = "replace"
    APPEND = "append"
    PREPEND = "prepend"


class Outcome(Enum):
    STORED = "STORED"
    NOT_STORED = "NOT_STORED"
    EXISTS = "EXISTS"
    NOT_FOUND = "NOT_FOUND"
    DELETED = "DELETED"
    TOUCHED = "TOUCHED"
    NON_NUMERIC = "NON_NUMERIC"


class Backpressure(Exception):
    """MAX_PENDING writes are waiting: the item was not stored."""


class NotPersisted(Exception):
    """A write-through write is stored and queued, but Postgres did not commit it in time
    (or refused it: ``dead``, then it is in the dead letters)."""

    def __init__(self, version: int, timeout: float, dead: bool = False) -> None:
        super().__init__(version, timeout, dead)
        self.version = version
        self.timeout = timeout
        self.dead = dead


@dataclass(frozen=True, slots=True)
class Item:
    value: bytes
    flags: int
    cas: int


@dataclass(frozen=True, slots=True)
class Stored:
    outcome: Outcome
    cas: int = 0
    value: bytes = b""  # incr/decr: the new number


def deadline_ms(exptime: int) -> int:
    """An exptime as an absolute Unix time in ms; 0 for none, <= now for "already expired"."""
    if exptime == 0:
        return 0
    if exptime < 0:
        return 1
    if exptime <= _RELATIVE_LIMIT:
        return int(time.time() * 1000) + exptime * 1000
    return exptime * 1000


class Items:
    """Items by memcached key, over one RecordStore."""

    def __init__(
        self,
        store: RecordStore,
        settings: Settings,
        collection: str,
        write_through: WriteThrough | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        # COLLECTION_WRITE_MODE "through" and BACKPRESSURE_MODE=through, as over HTTP.
        self.write_through = write_through
        self._turns = _Turns()
        self.collection = collection
        self.max_bytes = settings.max_document_bytes

    def name(self, key: bytes) -> tuple[str, str] | None:
        return values.record_name(key, self.collection)

    async def get(self, name: tuple[str, str]) -> Item | None:
        record = await self.store.read(*name)
        if record.document is None:
            return None
        value, flags = values.decode(record.document)
        return Item(value, flags, record.version)

    async def store_value(
        self,
        name: tuple[str, str],
        mode: Mode,
        value: bytes,
        flags: int,
        exptime: int,
        cas: int | None = None,
    ) -> Stored:
        if mode in (Mode.APPEND, Mode.PREPEND):
            return await self._concat(name, mode, value, cas)
        document = values.encode(value, flags, self.max_bytes)
        pre = Preconditions()
        if cas is not None:
            pre = Preconditions(if_match=Match(versions=frozenset((cas,))))
        elif mode is Mode.ADD:
            pre = Preconditions(if_none_match=_ANY)
        elif mode is Mode.REPLACE:
            pre = Preconditions(if_match=_ANY)
        result = await self._write(WriteCall(Op.PUT, *name, document, pre))
        if result.status is Status.OK:
            try:
                await self._bound_cache(name, exptime)
            except Exception as exc:  # the write is stored: its cached copy keeps its TTL
                log.warning("could not set the exptime of %s:%s: %s", *name, exc)
            return Stored(Outcome.STORED, result.version)
        if cas is not None:
            return Stored(await self._cas_failure(name))
        return Stored(Outcome.NOT_STORED)

    async def delete(self, name: tuple[str, str], cas: int | None = None) -> Stored:
        pre = Preconditions(if_match=Match(versions=frozenset((cas,)))) if cas else Preconditions()
        result = await self._write(WriteCall(Op.DELETE, *name, pre=pre))
        if result.status is Status.OK:
            return Stored(Outcome.DELETED, result.version)
        if result.status is Status.PRECONDITION_FAILED:
            return Stored(await self._cas_failure(name))
        return Stored(Outcome.NOT_FOUND)

    async def arith(
        self, name: tuple[str, str], delta: int, incr: bool, cas: int | None = None
    ) -> Stored:
        """incr/decr: 64-bit unsigned, incr wraps, decr stops at 0 (protocol.txt)."""

        def apply(value: bytes) -> bytes | None:
            text = value.strip(b" ")
            if not text.isdigit() or len(text) > 20 or int(text) > _MAX_U64:
                return None
            n = int(text)
            n = (n + delta) & _MAX_U64 if incr else max(n - delta, 0)
            return str(n).encode()

        return await self._modify(name, apply, cas)

    async def _concat(
        self, name: tuple[str, str], mode: Mode, data: bytes, cas: int | None
    ) -> Stored:
        def apply(value: bytes) -> bytes:
            return value + data if mode is Mode.APPEND else data + value

        done = await self._modify(name, apply, cas)
        if done.outcome is Outcome.NOT_FOUND and cas is None:
            return Stored(Outcome.NOT_STORED)  # append/prepend to nothing: NOT_STORED
        return Stored(done.outcome, done.cas)

    async def _modify(
        self, name: tuple[str, str], apply: Callable[[bytes], bytes | None], cas: int | None
    ) -> Stored:
        """Read, compute, write with a compare-and-set on the version read; again on
        conflict. ``apply`` gives the new value, or None if the old one does not allow it.

        This process' read-modify-writes of one key take turns (``_turns``): else a
        burst of them on a hot counter conflicts in lockstep, each round won by one, and
        an unlucky one can lose every round. Conflicts then come only from other
        processes (or plain sets), and a loser waits a random moment before it retries."""
        async with self._turns.take(name):
            return await self._modify_now(name, apply, cas)

    async def _modify_now(
        self, name: tuple[str, str], apply: Callable[[bytes], bytes | None], cas: int | None
    ) -> Stored:
        for attempt in range(_CAS_RETRIES):
            if attempt:
                await asyncio.sleep(random.uniform(0, 0.001 * min(attempt, 20)))
            current = await self.store.read(*name, fill=False)
            if current.document is None:
                return Stored(Outcome.NOT_FOUND)
            if cas is not None and current.version != cas:
                return Stored(Outcome.EXISTS)
            value, flags = values.decode(current.document)
            new = apply(value)
            if new is None:
                return Stored(Outcome.NON_NUMERIC)
            call = WriteCall(
                Op.PUT,
                *name,
                values.encode(new, flags, self.max_bytes),
                expect=current.version,
                stored=_stored_row(current),
            )
            result = await self._write(call)
            if result.status is Status.OK:
                return Stored(Outcome.STORED, result.version, new)
            if result.status is Status.NOT_FOUND:
                return Stored(Outcome.NOT_FOUND)
        raise Unavailable("redis", "too many concurrent writes to this key; retry")

    async def touch(self, name: tuple[str, str], exptime: int) -> Stored:
        record = await self.store.read(*name)
        if record.document is None:
            return Stored(Outcome.NOT_FOUND)
        await self._bound_cache(name, exptime, touch=True)
        return Stored(Outcome.TOUCHED, record.version)

    async def flush(self) -> int:
        """flush_all (when MEMCACHED_ALLOW_FLUSH): delete every record of the memcached
        collection, cached or persisted, through the write path (each delete queued for
        Postgres like any other). Returns how many were deleted."""
        names: set[str] = set()
        prefix = self.collection + ":"
        async for members in repository.all_keys(await self.store.pg.get()):
            names.update(m[len(prefix) :] for m in members if m.startswith(prefix))
        shards = self.store.shards
        async for raw in self.store.redis.scan_iter(
            match=shards.entries_pattern(self.collection), count=1000
        ):
            m = shards.member_of_entry(raw.decode() if isinstance(raw, bytes) else raw)
            if m is not None and m.startswith(prefix):
                names.add(m[len(prefix) :])
        deleted = 0
        keys = sorted(names)
        for i in range(0, len(keys), 500):
            calls = [WriteCall(Op.DELETE, self.collection, k) for k in keys[i : i + 500]]
            for outcome in await self.store.write_many(calls):
                if isinstance(outcome, Exception):
                    raise outcome
                if outcome.status is Status.FULL:
                    raise Backpressure
                deleted += outcome.status is Status.OK
        return deleted

    async def _write(self, call: WriteCall) -> WriteResult:
        """The write script's result; with write-through (the collection's mode, or past
        MAX_PENDING with BACKPRESSURE_MODE=through) only once Postgres committed it."""
        result = await self.store.write(call)
        through = self.settings.collection_write_mode.get(call.collection) == "through"
        if result.status is Status.FULL:
            if self.settings.backpressure_mode != "through" or self.write_through is None:
                raise Backpressure
            result = await self.store.write(replace(call, force=True))
            through = True
        if through and result.status is Status.OK and self.write_through is not None:
            timeout = self.settings.write_through_timeout
            outcome = await self.write_through(
                member(call.collection, call.key), result.version, timeout
            )
            if outcome is not Persisted.COMMITTED:
                raise NotPersisted(result.version, timeout, dead=outcome is Persisted.DEAD)
        return result

    async def _cas_failure(self, name: tuple[str, str]) -> Outcome:
        """A failed If-Match: EXISTS if the item is there (another version), else
        NOT_FOUND, as memcached answers a ``cas``."""
        record = await self.store.read(*name)
        return Outcome.NOT_FOUND if record.document is None else Outcome.EXISTS

    async def _bound_cache(self, name: tuple[str, str], exptime: int, touch: bool = False) -> None:
        """The exptime bounds the cached copy only (service/core/lua/cache_ttl.lua): the
        record stays in Postgres, and a later get reads it through like any miss."""
        if exptime == 0 and not touch:
            return
        entry = self.store.shards.for_record(*name).entry(*name)
        clean_ms = self.settings.clean_ttl_seconds * 1000
        await self.store.scripts.cache_ttl(keys=[entry], args=[deadline_ms(exptime), clean_ms])


class _Turns:
    """One asyncio lock per key while someone holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def take(self, name: tuple[str, str]) -> AsyncIterator[None]:
        lock, users = self._locks.get(name, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[name] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[name]
            if users == 1:
                del self._locks[name]
            else:
                self._locks[name] = (lock, users - 1)


def _stored_row(current: Record) -> repository.StoredRow | None:
    """Postgres' row as the compare-and-set knows it when the read was a miss."""
    if current.hit or current.document is None:
        return None
    return repository.StoredRow(current.document.decode(), current.version)
