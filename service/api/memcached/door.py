"""What every connection of the memcached door shares: the items, the counters that
``stats`` and /metrics report, and the settings commands read."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from service.api.memcached.errors import BadCommand
from service.api.memcached.ops import Items, Outcome

# What ``version`` answers: a memcached version string (clients such as libmemcached parse
# it as numbers); ``stats`` names wbcache itself.
PROTOCOL_VERSION = "1.6.0"


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    curr_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0
    sets: int = 0
    touches: int = 0
    flushes: int = 0
    # Errors a client asked not to hear about (noreply): counted, as nobody else sees them.
    noreply_errors: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        """``stats reset``: the counters, not the gauges (connections open)."""
        self.sets = self.touches = self.flushes = self.noreply_errors = 0
        self.total_connections = self.rejected_connections = 0
        self.counts.clear()

    def count(self, what: str, hit: bool) -> None:
        self.counts[f"{what}_{'hits' if hit else 'misses'}"] += 1

    def count_get(self, hit: bool) -> None:
        self.counts["cmd_get"] += 1
        self.count("get", hit)

    def count_cas(self, is_cas: bool, outcome: Outcome) -> None:
        if not is_cas:
            return
        if outcome is Outcome.EXISTS:
            self.counts["cas_badval"] += 1
        else:
            self.count("cas", outcome is Outcome.STORED)


@dataclass
class Door:
    items: Items
    allow_flush: bool
    max_connections: int
    stats: Stats = field(default_factory=Stats)
    version: str = PROTOCOL_VERSION

    def name(self, key: bytes) -> tuple[str, str]:
        name = self.items.name(key)
        if name is None:
            raise BadCommand("bad command line format")
        return name

    def settings_lines(self) -> Iterator[tuple[str, object]]:
        items = self.items
        yield "maxconns", self.max_connections
        yield "item_size_max", items.max_bytes
        yield "cas_enabled", "yes"
        yield "auth_enabled_sasl", "no"
        yield "flush_enabled", "yes" if self.allow_flush else "no"
        yield "default_collection", items.collection

    def stats_lines(self) -> Iterator[tuple[str, object]]:
        s = self.stats
        now = time.time()
        yield "pid", os.getpid()
        yield "uptime", int(now - s.started)
        yield "time", int(now)
        yield "version", self.version
        yield "server", "wbcache"
        yield "curr_connections", s.curr_connections
        yield "total_connections", s.total_connections
        yield "rejected_connections", s.rejected_connections
        yield "cmd_get", s.counts["cmd_get"]
        yield "cmd_set", s.sets
        yield "cmd_flush", s.flushes
        yield "cmd_touch", s.touches
        for what in ("get", "delete", "incr", "decr", "cas", "touch"):
            yield f"{what}_misses", s.counts[f"{what}_misses"]
            yield f"{what}_hits", s.counts[f"{what}_hits"]
        yield "cas_badval", s.counts["cas_badval"]
        yield "noreply_errors", s.noreply_errors
