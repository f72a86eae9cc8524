"""Shards: a record's keys and its shard's queue share one hash slot; shard tags spread the
shards evenly over the slots; one unsharded shard keeps the keys of before shards."""

from __future__ import annotations

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from service.core.redis_keys import Keys
from service.core.shards import Shards, shard_of, shard_tag


@pytest.mark.parametrize("count", [1, 3, 16, 64, 1024])
def test_each_shard_tag_hashes_into_its_own_slot_range(count: int) -> None:
    for shard in range(count):
        slot = key_slot(shard_tag(shard, count).encode())
        low = shard * REDIS_CLUSTER_HASH_SLOTS // count
        assert low <= slot < (shard + 1) * REDIS_CLUSTER_HASH_SLOTS // count


def test_every_key_a_script_touches_is_in_its_shards_slot() -> None:
    shards = Shards("wb:", 16, tagged=True)
    m = "users:alice"
    k = shards.for_member(m)
    names = [
        k.entry("users", "alice"),
        k.floor("users", "alice"),
        k.dirty,
        k.inflight,
        k.pending_counts,
        k.pending_keys,
        k.leases,
        k.batch_age,
        k.batch("b1"),
        k.dead,
        k.wake,
        k.counters,
        k.flush_log,
    ]
    assert len({key_slot(n.encode()) for n in names}) == 1
    assert all(n.startswith("wb:{") for n in names)


def test_one_untagged_shard_keeps_the_names_of_before_shards() -> None:
    k = Shards("wb:", 1)[0]
    assert k == Keys("wb:")
    assert (k.entry("users", "alice"), k.dirty, k.counters) == (
        "wb:e:users:alice",
        "wb:dirty",
        "wb:counters",
    )


def test_members_spread_over_the_shards_and_group_back() -> None:
    shards = Shards("wb:", 8, tagged=True)
    members = [f"c:{i}" for i in range(4000)]
    groups = shards.group(members)
    assert sorted(groups) == list(range(8))
    assert all(350 < len(g) < 650 for g in groups.values())
    assert all(shard_of(m, 8) == s for s, g in groups.items() for m in g)


@pytest.mark.parametrize(("count", "tagged"), [(1, False), (8, True)])
def test_an_entry_key_gives_back_its_member(count: int, tagged: bool) -> None:
    shards = Shards("wb:", count, tagged)
    for m in ["users:alice", "c:k:with:colons", "c:{braces}"]:
        collection, _, key = m.partition(":")
        assert shards.member_of_entry(shards.for_member(m).entry(collection, key)) == m
    assert shards.member_of_entry("other:e:x:y") is None
