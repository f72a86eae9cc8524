"""Entity-tag lists, content types and settings parsing (pure logic, no I/O)."""

from __future__ import annotations

import re

import pytest

from service.adapters.postgres import asyncpg_dsn, sqlalchemy_url
from service.api.errors import ApiError
from service.api.http import (
    MAX_KEY_BYTES,
    is_json,
    none_match_hits,
    parse_match,
    validate_collection,
    validate_key,
)
from service.core.record_types import Match
from service.core.redis_keys import member, split_member


def test_star() -> None:
    assert parse_match("*", "If-Match") == Match(any=True)


def test_list_and_weak_tags() -> None:
    assert parse_match('"1", W/"2" ,"3"', "If-None-Match") == Match(versions=frozenset({1, 2, 3}))
    # Strong comparison for If-Match: a weak tag never matches.
    assert parse_match('"1", W/"2"', "If-Match") == Match(versions=frozenset({1}))


def test_foreign_tags_match_nothing() -> None:
    assert parse_match('"abc"', "If-Match") == Match(versions=frozenset())


@pytest.mark.parametrize("bad", ["abc", '"1" "2"', '"1",,x', "W/1"])
def test_garbage_is_a_400(bad: str) -> None:
    with pytest.raises(ApiError) as exc:
        parse_match(bad, "If-Match")
    assert exc.value.status == 400


def test_none_match_hits() -> None:
    assert none_match_hits(Match(any=True), 5)
    assert none_match_hits(Match(versions=frozenset({5})), 5)
    assert not none_match_hits(Match(versions=frozenset({4})), 5)
    assert not none_match_hits(None, 5)


def test_content_types() -> None:
    assert is_json("application/json; charset=utf-8")
    assert is_json("application/vnd.thing+json")
    assert is_json(None)
    assert not is_json("text/plain")
    assert is_json("application/merge-patch+json", patch=True)
    assert not is_json("application/json", patch=True)
    assert not is_json(None, patch=True)


def test_member_round_trip_keeps_colons_in_keys() -> None:
    assert split_member(member("users", "a:b:c")) == ("users", "a:b:c")


def test_database_urls() -> None:
    assert asyncpg_dsn("postgresql+asyncpg://u@h/db") == "postgresql://u@h/db"
    assert asyncpg_dsn("postgres://u@h/db") == "postgresql://u@h/db"
    assert (
        sqlalchemy_url("postgresql://u@h:5/db?sslmode=require")
        == "postgresql+asyncpg://u@h:5/db?ssl=require"
    )


def _key_error(key: str) -> str | None:
    try:
        validate_key(key)
    except ApiError as exc:
        return exc.message
    return None


def test_key_rules_hold_for_every_character() -> None:
    """1-512 bytes of UTF-8 after percent-decoding, no control character: the same answer
    whether the key is plain ASCII (checked by the shortcut) or not."""
    for c in map(chr, range(0x250)):
        control = ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
        for key in (c, f"a{c}b", c * 300):
            size = len(key.encode("utf-8"))
            expected = size > MAX_KEY_BYTES or control
            assert (_key_error(key) is not None) == expected, (key, _key_error(key))
    assert _key_error("") is not None
    assert _key_error("k" * MAX_KEY_BYTES) is None
    assert _key_error("k" * (MAX_KEY_BYTES + 1)) is not None
    assert _key_error("é" * 256) is None and _key_error("é" * 257) is not None
    assert _key_error("\udcff") == "A key must be valid UTF-8."


def test_collection_names_are_checked_the_same_every_time() -> None:
    names = ["users", "a", "0-x_y", "x" * 64, "x" * 65, "Users", "-a", "a b", "", "é", "a\n"]
    for _ in range(3):  # the answers are remembered: the same ones
        for name in names:
            try:
                validate_collection(name)
                ok = True
            except ApiError:
                ok = False
            assert ok == bool(re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", name)), name
