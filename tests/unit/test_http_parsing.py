"""Entity-tag lists, content types and settings parsing (pure logic, no I/O)."""

from __future__ import annotations

import pytest

from service.adapters.postgres import asyncpg_dsn, sqlalchemy_url
from service.api.errors import ApiError
from service.api.http import is_json, none_match_hits, parse_match
from service.core.records import Match
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
