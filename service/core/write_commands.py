"""What the write scripts are sent: write.lua's KEYS and ARGV for one write, and
write_many.lua's for writes to distinct keys (service/core/lua/ documents both); and
what write.lua answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.config import Settings
from service.core.key_filter import KeyFilter
from service.core.record_types import Status, WriteCall, WriteResult
from service.core.redis_keys import Keys, member
from service.core.shards import Shards

# A script call's KEYS and ARGV.
Command = tuple[list[str], list[Any]]

# Writes per call of write_many.lua: Redis serves nobody else while it runs (about 10 µs
# per write), so a batch of 1,000 writes to one shard is several calls, one round trip.
WRITES_PER_CALL = 200
# Where write_many.lua's arguments hold the run_id: after the count of each write's own
# arguments and write.lua's ARGV 12-14, as its ARGV 15 (``_shared_args``).
_SHARED_RUN_ID = 4


class WriteCommands:
    def __init__(self, settings: Settings, shards: Shards, key_filter: KeyFilter) -> None:
        self.settings = settings
        self.shards = shards
        self.key_filter = key_filter
        # Public collections' writes queue their edge purge in write.lua.
        self._purged = settings.purged_collections

    def one(self, call: WriteCall, run_id: str = "") -> Command:
        """The write script's keys and arguments (service/core/lua/write.lua documents
        them)."""
        m = member(call.collection, call.key)
        k = self.shards.for_member(m)
        keys = [k.member_entry(m), *self._shard_keys(k)]
        if self._purged and call.collection in self._purged:
            keys.append(k.purge_queue)  # write.lua queues the edge purge with the write
        return keys, [
            *self._own_args(call, m),
            *self._shared_args(call.force, run_id),
            *self.key_filter.positions_args(m),
        ]

    def _shard_keys(self, k: Keys) -> list[str]:
        """write.lua's KEYS after the entry: the queue keys of the entry's shard."""
        kf = self.key_filter
        return [
            k.dirty,
            k.inflight,
            k.wake,
            k.dead,
            k.pending_counts,
            kf.key(k),
            kf.origin(k),
            k.pending_keys,
        ]

    def _own_args(self, call: WriteCall, m: str) -> list[Any]:
        """write.lua's ARGV 1-11: the call's own."""
        pre, stored = call.pre, call.stored
        im_mode, im_list = pre.if_match.lua() if pre.if_match else ("0", "")
        inm_mode, inm_list = pre.if_none_match.lua() if pre.if_none_match else ("0", "")
        return [
            call.op.value,
            call.document,
            m,
            im_mode,
            im_list,
            inm_mode,
            inm_list,
            "" if call.expect is None else str(call.expect),
            "0" if stored is None else "1",
            "0" if stored is None else str(stored.version),
            "1" if stored is not None and stored.value is not None else "0",
        ]

    def _shared_args(self, force: bool, run_id: str) -> list[Any]:
        """write.lua's ARGV 12-15: the same for every write of a batch (write_many.lua
        takes them once)."""
        settings = self.settings
        return [
            settings.write_delay_ms + 5000,
            0 if force else settings.max_pending,
            self.key_filter.complete_arg(),
            run_id,
        ]

    def many(self, calls: Sequence[WriteCall]) -> tuple[list[list[int]], list[Command]]:
        """The indexes of ``calls`` by shard (a script's keys live in one slot) and by
        ``force``, in order, at most ``WRITES_PER_CALL`` per group; and each group's
        write_many.lua keys and arguments: the shard's keys of write.lua, each call's
        entry; then the number of each call's own arguments, the arguments they share
        (write.lua's ARGV 12-15, once) and each call's own ones one after the other."""
        by_group: dict[tuple[int, bool], list[tuple[int, str]]] = {}
        for i, call in enumerate(calls):
            m = member(call.collection, call.key)
            by_group.setdefault((self.shards.index(m), call.force), []).append((i, m))
        groups: list[list[int]] = []
        commands: list[Command] = []
        kf = self.key_filter
        for (shard, force), members in by_group.items():
            k = self.shards[shard]
            shared = self._shared_args(force, "")
            for start in range(0, len(members), WRITES_PER_CALL):
                part = members[start : start + WRITES_PER_CALL]
                entries = [k.member_entry(m) for _, m in part]
                args: list[Any] = [0, *shared]
                for i, m in part:
                    one = self._own_args(calls[i], m) + kf.positions_args(m)
                    if args[0] != len(one):
                        if args[0]:
                            raise AssertionError("write.lua's arguments differ in number")
                        args[0] = len(one)
                    args += one
                groups.append([i for i, _ in part])
                commands.append((self._shard_keys(k) + entries, args))
        return groups, commands

    @staticmethod
    def with_run_id(command: Command, run_id: str) -> Command:
        """A write_many.lua command of ``many`` (built with no run_id), given ``run_id``."""
        keys, args = command
        return keys, [*args[:_SHARED_RUN_ID], run_id, *args[_SHARED_RUN_ID + 1 :]]


def reply_text(v: Any) -> str:
    """A reply's field as text (a client without decode_responses gives bytes)."""
    return v.decode() if isinstance(v, bytes) else str(v)


def write_outcome(raw: list[Any]) -> tuple[WriteResult, bool] | None:
    """The write script's reply: the result and whether to schedule a flush, or None for
    MISS (the key is not cached: Postgres must supply its version floor first)."""
    status_text = reply_text(raw[0])
    if status_text == "MISS":
        return None
    status = Status(status_text)
    if status is not Status.OK:
        return WriteResult(status, int(reply_text(raw[1])) if len(raw) > 1 else 0), False
    created, schedule = reply_text(raw[2]) == "1", reply_text(raw[3]) == "1"
    return WriteResult(Status.OK, int(reply_text(raw[1])), created), schedule
