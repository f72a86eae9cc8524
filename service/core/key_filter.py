"""The key filter: which records Postgres may hold, so that a write to a key that is not
cached needs no Postgres read when the answer is "certainly not".

A Bloom filter per shard, a Redis bitmap (``Keys.key_filter``): each record's member sets
``HASHES`` bits, placed by SHA-1 (double hashing), computed here and passed to the write
script (service/core/lua/write.lua), which reads and sets them. One more bit, at index
``bits``, says the filter is *complete*: every key that has a row or a tombstone in
Postgres has its bits set. Then a key with any of its bits unset has never been written:
the write script takes it as absent, at version 0 (a create: 201, ``If-Match`` fails,
DELETE and PATCH answer 404), in the same single call as a write to a cached key. A key
whose bits are all set (written before, or a false positive, about 1 % at capacity) and
every key while the filter is incomplete take the old path: Postgres supplies the row.

Every write sets its key's bits once the bitmap exists (a deleted key keeps them: its
tombstone is a row too), whether the filter is complete or not. A worker creates the
bitmap, incomplete, when it finds none (first start, Redis' data lost) and completes it
(service/core/key_filter_build.py): it adds the members of every cache entry (writes
from before the bitmap existed that are still queued have one), then every key of
``records`` and ``tombstones`` read afterwards (each queued write it missed was committed
before its entry went away, so before that read), ORs them in, and sets the complete bit.
Writes during the build add themselves.

The filter is trusted only on the Redis server that completed it (its ``run_id``, kept
next to it): on a replica promoted by a failover, or after a restart, keys written just
before may be missing from it while Postgres holds their rows, so writes read Postgres
again until a worker has completed it there. The client learns a server's ``run_id`` on
each connection (service/adapters/redis_mux.py, which the filter needs: without it, as on
a Redis Cluster for now, or with REDIS_MULTIPLEX off, the filter is not used).

Rows written into Postgres behind the service's back are unknown to a complete filter:
delete the filter's keys (``<prefix>kf:*``) after such an import, and a worker rebuilds.

``KEY_FILTER_CAPACITY`` (0: no filter) sizes it: about 9.6 bits per key for 1 % false
positives at capacity. Past capacity the filter still answers right, only more often
"maybe" (a Postgres read, as without it). The bit count is in the key's name, so a new
size builds a new filter.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from service.config import Settings
from service.core.redis_keys import Keys

# Bits per key: 7 hashes and ~9.6 bits per key give a 1 % false-positive rate at capacity.
HASHES = 7
BITS_PER_KEY = 9.6
# The smallest bitmap per shard (1 KiB): many shards of a small capacity.
MIN_BITS = 8192
# SHA-1's first two 64-bit words, big-endian: the two hashes of double hashing.
_TWO_WORDS = struct.Struct(">QQ").unpack_from


@dataclass(frozen=True, slots=True)
class KeyFilter:
    """The filter's geometry: ``bits`` hashed bits per shard (0: no filter), then the
    complete bit at index ``bits``."""

    bits: int

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyFilter:
        if settings.key_filter_capacity <= 0 or settings.cluster:
            return cls(0)
        per_shard = settings.key_filter_capacity * BITS_PER_KEY / settings.shards
        return cls(max(MIN_BITS, math.ceil(per_shard / 8) * 8))

    @property
    def enabled(self) -> bool:
        return self.bits > 0

    @property
    def complete_bit(self) -> int:
        return self.bits

    def key(self, keys: Keys) -> str:
        return keys.key_filter(self.bits)

    def positions(self, m: str) -> list[int]:
        """The bits of member ``m`` (``collection:key``)."""
        h1, h2 = _TWO_WORDS(hashlib.sha1(m.encode(), usedforsecurity=False).digest())
        bits = self.bits
        # (h1 + i * h2) % bits, step by step with h1 and h2 reduced first (half the CPU of
        # the plain formula: it runs for every write).
        p, step = h1 % bits, (h2 | 1) % bits
        out = [p]
        for _ in range(HASHES - 1):
            p += step
            if p >= bits:
                p -= bits
            out.append(p)
        return out

    def script_args(self, m: str, run_id: str = "") -> list[int | str]:
        """What the scripts take: the complete bit's index, the run_id of the server the
        command goes to ("": not known, the filter is not trusted) and ``m``'s bits; or
        "" (no filter)."""
        if not self.bits:
            return [""]
        return [self.bits, run_id, *self.positions(m)]

    def complete_arg(self) -> int | str:
        """The complete bit's index as the scripts take it; "" when there is no filter."""
        return self.bits or ""

    def positions_args(self, m: str) -> list[int]:
        """``m``'s bits as the scripts take them (none when there is no filter)."""
        return self.positions(m) if self.bits else []

    def origin(self, keys: Keys) -> str:
        return keys.key_filter_origin(self.bits)

    def bitmap(self, members: Iterable[str] = ()) -> bytearray:
        """A bitmap of ``members`` in Redis' bit order (bit 0 is the first byte's highest),
        ready to be ORed into the filter (the complete bit left unset)."""
        out = bytearray(self.bits // 8)
        for m in members:
            self.add(out, m)
        return out

    def add(self, bitmap: bytearray, m: str) -> None:
        """Set ``m``'s bits in ``bitmap`` (from ``bitmap()``)."""
        for p in self.positions(m):
            bitmap[p >> 3] |= 0x80 >> (p & 7)

    def may_hold(self, bitmap: bytes, m: str) -> bool:
        """Whether ``bitmap`` (the filter's value) has every bit of ``m`` set."""
        return all(_bit(bitmap, p) for p in self.positions(m))


def _bit(bitmap: bytes, p: int) -> bool:
    return p >> 3 < len(bitmap) and bool(bitmap[p >> 3] & (0x80 >> (p & 7)))


def complete(bitmap: bytes | None, key_filter: KeyFilter) -> bool:
    """Whether a filter's value has its complete bit set."""
    return bitmap is not None and _bit(bitmap, key_filter.complete_bit)
