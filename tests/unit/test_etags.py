"""Entity tags compare as text (RFC 9110 §8.8.3.2): only the exact tag we issue matches."""

from __future__ import annotations

import pytest

from service.api.http import etag, none_match_hits, parse_match
from service.core.record_types import Match


@pytest.mark.parametrize("header", ["If-Match", "If-None-Match"])
@pytest.mark.parametrize(
    "tag",
    [
        '"0123"',
        '"00123"',
        '"+123"',
        '"123 "',
        '" 123"',
        '"123.0"',
        '"1_23"',
        '"\u00b9\u00b2\u00b3"',
        '"\u0661\u0662\u0663"',
        '"\uff11\uff12\uff13"',
        '"0"',
        '"-123"',
    ],
)
def test_only_the_issued_text_names_a_version(header: str, tag: str) -> None:
    assert parse_match(tag, header) == Match(versions=frozenset())
    assert parse_match(f'{tag}, "7"', header) == Match(versions=frozenset({7}))
    assert not none_match_hits(parse_match(tag, header), 123)


@pytest.mark.parametrize("version", [1, 9, 10, 123, 1795695250531747, 2**63 - 1])
def test_the_issued_tag_matches(version: int) -> None:
    for header in ("If-Match", "If-None-Match"):
        assert parse_match(etag(version), header) == Match(versions=frozenset({version}))
    assert none_match_hits(parse_match(etag(version), "If-None-Match"), version)
    # The text the write script compares: the issued tags, as they were sent.
    assert parse_match(etag(version), "If-Match") is not None
    assert Match(versions=frozenset({version})).lua() == ("2", f",{version},")
