"""Every Redis key the service owns, in one place (all under REDIS_PREFIX). Only Python
names keys: every key a Lua script touches is passed in its KEYS (Redis Cluster routes a
script by them), never built inside the script.

A record is addressed by its *member* string ``collection:key``: collections never hold
``:``, so the first ``:`` splits it, and ``<prefix>e:<member>`` is its cache entry.

With shards (service/core/shards.py), a member's keys and its shard's queue carry the
shard's hash tag after the prefix, ``wb:{3a}:e:users:alice``, ``wb:{3a}:dirty``: every
script's keys then live in one Redis Cluster slot. ``tag`` is empty without shards, which
leaves every name exactly as it was before shards existed. The few keys no script touches
with a shard's keys (workers, readiness probe, last error, arq's queue) carry no tag.
"""

from __future__ import annotations

from dataclasses import dataclass


def member(collection: str, key: str) -> str:
    return f"{collection}:{key}"


def glob_escape(text: str) -> str:
    """A literal for a Redis SCAN MATCH pattern (a prefix may hold * ? [ ] or \\)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def split_member(m: str) -> tuple[str, str]:
    collection, _, key = m.partition(":")
    return collection, key


@dataclass(frozen=True)
class Keys:
    prefix: str
    tag: str = ""  # "{<shard tag>}:" with shards, else ""

    @property
    def shard_prefix(self) -> str:
        return self.prefix + self.tag

    def entry(self, collection: str, key: str) -> str:
        """Hash: v = version, d = canonical document (absent for a tombstone), t = 1 if deleted,
        p = a version known committed while a newer one is pending (an entry neither dirty,
        in flight nor dead-lettered is committed at v). No TTL while dirty."""
        return f"{self.shard_prefix}e:{collection}:{key}"

    def member_entry(self, m: str) -> str:
        """The entry of member ``m`` (``collection:key``), as ``entry`` names it."""
        return f"{self.shard_prefix}e:{m}"

    @property
    def entry_prefix(self) -> str:
        return f"{self.shard_prefix}e:"

    def floor(self, collection: str, key: str) -> str:
        """Short-lived lower bound for cache fills after an invalidation."""
        return f"{self.shard_prefix}f:{collection}:{key}"

    def member_floor(self, m: str) -> str:
        """The fill floor of member ``m``, as ``floor`` names it."""
        return f"{self.shard_prefix}f:{m}"

    @property
    def floor_prefix(self) -> str:
        return f"{self.shard_prefix}f:"

    @property
    def dirty(self) -> str:
        """ZSET member -> ms when it became dirty: the write-behind queue."""
        return f"{self.shard_prefix}dirty"

    @property
    def inflight(self) -> str:
        """HASH member -> batch id holding it."""
        return f"{self.shard_prefix}inflight"

    @property
    def pending_counts(self) -> str:
        """HASH collection -> how many of its members are in ``dirty`` plus ``inflight``.

        Invariant: every script that adds a member to, or removes one from, ``dirty`` or
        ``inflight`` (write, claim, release, deadletters) adjusts its collection's field by
        the same amount in the same script, so the sum of the fields is ``pending`` and
        /v1/stats reads pending per collection in O(collections). A field at 0 is removed."""
        return f"{self.shard_prefix}pendingc"

    @property
    def pending_keys(self) -> str:
        """ZSET, every score 0: the members whose entry, not Postgres, says what a listing
        shows (GET /v1/{collection}): each member of ``dirty``, ``inflight`` or ``dead``.
        Scores all 0 make ZRANGEBYLEX read one collection's members (``collection:``
        prefix) in byte order, in O(log N + its own).

        Invariant: write.lua adds a member when it adds it to ``dirty`` (one ZADD per key
        that becomes pending); release.lua removes the members it leaves clean, and
        deadletters.lua those it drops. A member that lingers (an entry deleted by hand)
        costs a listing one entry read: the entry, absent, lets Postgres answer."""
        return f"{self.shard_prefix}pkeys"

    @property
    def leases(self) -> str:
        """ZSET batch id -> lease expiry (ms)."""
        return f"{self.shard_prefix}leases"

    @property
    def batch_age(self) -> str:
        """ZSET batch id -> oldest dirty time (ms) in the batch."""
        return f"{self.shard_prefix}batchage"

    def batch(self, batch_id: str) -> str:
        """STRING: msgpack array member, dirty time (ms), ... of each member batch
        ``batch_id`` holds (claim.lua; a HASH member -> time before, still read)."""
        return f"{self.shard_prefix}b:{batch_id}"

    @property
    def dead(self) -> str:
        """HASH member -> JSON description of the dead-lettered write."""
        return f"{self.shard_prefix}dead"

    @property
    def wake(self) -> str:
        """Set while a flush wake-up job is scheduled, so writes enqueue one per window."""
        return f"{self.shard_prefix}wake"

    def key_filter(self, bits: int) -> str:
        """Bitmap: the shard's key filter of ``bits`` bits (service/core/key_filter.py)."""
        return f"{self.shard_prefix}kf:{bits}"

    def key_filter_origin(self, bits: int) -> str:
        """String: the run_id of the Redis server on which the filter was completed."""
        return f"{self.shard_prefix}kf:{bits}:origin"

    def key_filter_scratch(self, bits: int) -> str:
        """String: a key filter build's bitmap, for the moment it is ORed in."""
        return f"{self.shard_prefix}kf:{bits}:build"

    @property
    def key_filter_lock(self) -> str:
        """Held (with a TTL) by the worker building incomplete key filters."""
        return f"{self.prefix}kf:lock"

    @property
    def purge_queue(self) -> str:
        """ZSET: edge purges (service/core/purge.py) -> when due (ms): ``r:<member>`` for
        a record, ``c:<collection>`` for a collection, ``~`` before either for the second,
        delayed purge; a claimed purge's score is its lease's end."""
        return f"{self.shard_prefix}purgeq"

    @property
    def workers(self) -> str:
        """ZSET worker id -> last heartbeat (ms)."""
        return f"{self.prefix}workers"

    @property
    def served(self) -> str:
        """Set (once, the time in ms) by the first API or worker that starts on this Redis:
        what tells the CLI that it reads a Redis the service uses, not an unrelated one
        whose empty queue would look healthy."""
        return f"{self.prefix}served"

    @property
    def counters(self) -> str:
        """HASH of global counters (flushed, failures, retries, hits, misses, ...)."""
        return f"{self.shard_prefix}counters"

    @property
    def flush_log(self) -> str:
        """ZSET of recent flush batches (score ms, member "ms:count:id") for rates."""
        return f"{self.shard_prefix}flushlog"

    @property
    def ready_probe(self) -> str:
        """Written (with a short TTL) by /readyz to learn whether Redis accepts writes."""
        return f"{self.prefix}readyz"

    @property
    def last_error(self) -> str:
        return f"{self.prefix}lasterror"

    @property
    def arq_queue(self) -> str:
        return f"{self.prefix}arq:queue"
