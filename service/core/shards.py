"""Shards: the write-behind queue split so that it can live on several Redis primaries.

A record belongs to shard ``crc32(member) % S`` (S = REDIS_SHARDS, fixed at deploy time).
Each shard has its own queue (dirty set, in-flight hash, leases, batches, dead letters,
counters) and its records' entries, all under one hash tag, so every Lua script touches
one Redis Cluster slot. A shard's tag is chosen to hash into the shard's own 1/S of the
16,384 slots: a Cluster whose primaries hold equal slot ranges then holds equal numbers
of shards, and S a multiple of the primaries spreads the queue evenly.

Without shards (one, on a standalone Redis or Sentinel), the tag is empty: the keys are
exactly those of a deployment from before shards.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from functools import cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from service.config import Settings
from service.core.redis_keys import Keys, glob_escape


@cache
def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of ``shard`` of ``shards``: the first short name whose slot falls in
    the shard's own range of slots (deterministic: every process finds the same tag)."""
    low = shard * REDIS_CLUSTER_HASH_SLOTS // shards
    high = (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    n = 0
    while True:
        tag = f"{shard}.{n}" if n else str(shard)
        if low <= key_slot(tag.encode()) < high:
            return tag
        n += 1


def shard_of(m: str, shards: int) -> int:
    """The shard of member ``m`` (``collection:key``)."""
    return zlib.crc32(m.encode()) % shards if shards > 1 else 0


class Shards:
    """The key names of every shard, by index; ``for_member`` picks a record's."""

    def __init__(self, prefix: str, count: int = 1, tagged: bool = False) -> None:
        self.count = count
        self._keys = [
            Keys(prefix, "{" + shard_tag(s, count) + "}:" if tagged else "") for s in range(count)
        ]

    @classmethod
    def from_settings(cls, settings: Settings) -> Shards:
        return cls(settings.redis_prefix, settings.shards, settings.sharded)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Keys:
        return self._keys[index]

    def __iter__(self) -> Iterator[Keys]:
        return iter(self._keys)

    @property
    def tagged(self) -> bool:
        return bool(self._keys[0].tag)

    @property
    def any(self) -> Keys:
        """The keys without a shard (workers, probes, arq): the same in every shard's Keys;
        and the shard where per-process counters (cache hits) are added up."""
        return self._keys[0]

    def index(self, m: str) -> int:
        return shard_of(m, self.count)

    def for_member(self, m: str) -> Keys:
        return self._keys[shard_of(m, self.count)]

    def for_record(self, collection: str, key: str) -> Keys:
        return self.for_member(f"{collection}:{key}")

    def group(self, members: Iterable[str]) -> dict[int, list[str]]:
        """``members`` by shard, each list in the order given."""
        out: dict[int, list[str]] = {}
        for m in members:
            out.setdefault(shard_of(m, self.count), []).append(m)
        return out

    def entries_pattern(self, collection: str | None = None) -> str:
        """A SCAN pattern for the cache entries of ``collection`` (or of every record), in
        every shard."""
        any_shard = self._keys[0]
        records = "*" if collection is None else f"{glob_escape(collection)}:*"
        if not self.tagged:
            return f"{glob_escape(any_shard.entry_prefix)}{records}"
        return f"{glob_escape(any_shard.prefix)}{{*}}:e:{records}"

    def member_of_entry(self, entry_key: str) -> str | None:
        """The member whose entry ``entry_key`` is (a SCAN result), or None."""
        prefix = self._keys[0].prefix
        if not entry_key.startswith(prefix):
            return None
        rest = entry_key[len(prefix) :]
        if self.tagged:
            if not rest.startswith("{"):
                return None
            rest = rest[rest.find("}:") + 2 :]
        if not rest.startswith("e:"):
            return None
        return rest[2:]
