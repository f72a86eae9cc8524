"""The key filter's geometry (service/core/key_filter.py): sizes, bits, bit order."""

from __future__ import annotations

import hashlib

from service.config import Settings
from service.core.key_filter import HASHES, MIN_BITS, KeyFilter, complete


def _filter(capacity: int, shards: int = 1) -> KeyFilter:
    return KeyFilter.from_settings(
        Settings(key_filter_capacity=capacity, redis_shards=shards, redis_prefix="t:")
    )


def test_the_size_follows_the_capacity_and_the_shards() -> None:
    assert _filter(1_000_000).bits == 9_600_000
    assert _filter(1_000_000, shards=4).bits == 2_400_000
    assert _filter(10).bits == MIN_BITS
    assert _filter(1_000_003).bits % 8 == 0
    assert not _filter(0).enabled
    assert _filter(0).script_args("c:k") == [""]


def test_positions_are_stable_and_in_range() -> None:
    kf = _filter(1000)
    positions = kf.positions("users:alice")
    assert positions == kf.positions("users:alice") and len(positions) == HASHES
    assert all(0 <= p < kf.bits for p in positions)
    assert kf.positions("users:bob") != positions
    assert kf.script_args("users:alice", "r1") == [kf.bits, "r1", *positions]


def test_positions_are_double_hashing_of_sha1() -> None:
    """The bits every filter in Redis was built with: a member's positions never change,
    however they are computed (SHA-1's first two 64-bit words, h1 + i * h2 mod bits)."""
    for bits in (MIN_BITS, 9_600_000, 38_400_000, 2**40 + 8):
        kf = KeyFilter(bits)
        for n in range(300):
            m = f"c{n % 7}:key-{n}"
            digest = hashlib.sha1(m.encode()).digest()
            h1 = int.from_bytes(digest[:8], "big")
            h2 = int.from_bytes(digest[8:16], "big") | 1
            assert kf.positions(m) == [(h1 + i * h2) % bits for i in range(HASHES)]
    assert KeyFilter(38_400_000).positions("users:alice")[:2] == [28758602, 11451315]


def test_a_bitmap_holds_what_was_added_in_redis_bit_order() -> None:
    kf = KeyFilter(64)
    bitmap = kf.bitmap(["a:1"])
    assert kf.may_hold(bytes(bitmap), "a:1")
    # Bit p is byte p // 8's (0x80 >> p % 8), as Redis' GETBIT numbers them.
    p = kf.positions("a:1")[0]
    assert bitmap[p // 8] & (0x80 >> (p % 8))
    assert not kf.may_hold(bytes(kf.bitmap()), "a:1")
    assert not complete(bytes(bitmap), kf)
    assert complete(bytes(bitmap) + b"\x80", kf)  # the complete bit: index 64
    assert not complete(None, kf)


def test_false_positives_stay_near_one_percent_at_capacity() -> None:
    kf = _filter(20_000)
    bitmap = bytes(kf.bitmap(f"c:{i}" for i in range(20_000)))
    false = sum(kf.may_hold(bitmap, f"other:{i}") for i in range(20_000))
    assert false / 20_000 < 0.02


def test_no_filter_on_a_cluster_yet() -> None:
    settings = Settings(redis_url="redis+cluster://127.0.0.1:7000", redis_prefix="t:")
    assert not KeyFilter.from_settings(settings).enabled
