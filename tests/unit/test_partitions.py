"""How ``migrate`` reads an existing records table's layout (service.adapters.partitions)."""

from __future__ import annotations

import pytest

from service.adapters.partitions import Layout, check_count


def _bounds(*pairs: tuple[int, int]) -> tuple[str, ...]:
    return tuple(f"FOR VALUES WITH (modulus {m}, remainder {r})" for m, r in pairs)


def test_hash_partitions_is_n_only_for_the_whole_layout() -> None:
    cols = ("collection", "key")
    assert Layout("hash", cols, _bounds(*((4, r) for r in (2, 0, 3, 1)))).hash_partitions() == 4
    # A remainder missing, a modulus that is not the count, another key, another strategy.
    assert Layout("hash", cols, _bounds((4, 0), (4, 1), (4, 2))).hash_partitions() is None
    assert Layout("hash", cols, _bounds((2, 0), (4, 1), (4, 3))).hash_partitions() is None
    assert Layout("hash", ("collection",), _bounds((2, 0), (2, 1))).hash_partitions() is None
    assert Layout("list", cols, ("FOR VALUES IN ('a')",)).hash_partitions() is None
    assert Layout(None).hash_partitions() is None
    assert Layout("hash", cols, ()).hash_partitions() is None


def test_describe_names_what_an_operator_has() -> None:
    assert Layout(None).describe() == "a plain table (not partitioned)"
    hashed = Layout("hash", ("collection", "key"), _bounds((2, 0), (2, 1)))
    assert hashed.describe() == "hash-partitioned on (collection, key) into 2 partitions"
    other = Layout("list", ("collection",), ("FOR VALUES IN ('a')",))
    assert other.describe() == "list-partitioned on (collection) with 1 partitions"


@pytest.mark.parametrize("n", [2, 8, 1024])
def test_check_count_takes_2_to_1024(n: int) -> None:
    assert check_count(n) == n


@pytest.mark.parametrize("n", [-1, 0, 1, 1025])
def test_check_count_refuses_the_rest(n: int) -> None:
    with pytest.raises(ValueError, match="2 to 1024"):
        check_count(n)
