"""The memcached door's pure parts: framing across any TCP split, and items as documents."""

from __future__ import annotations

import random

import pytest

from service.api.memcached.parser import Parser, Refused, Request
from service.api.memcached.values import decode, encode, record_name

STREAM = (
    b"set a 0 0 5\r\nab\r\nc\r\n"  # \r\n inside the value
    b"get a b\r\n"
    b"cas a 3 10 0 99 noreply\r\n\r\n"
    b"ms k 2 F1 T0\r\nxy\r\n"
    b"mn\r\n"
)
EXPECTED = [
    Request(b"set", [b"a", b"0", b"0", b"5"], b"ab\r\nc"),
    Request(b"get", [b"a", b"b"]),
    Request(b"cas", [b"a", b"3", b"10", b"0", b"99", b"noreply"], b""),
    Request(b"ms", [b"k", b"2", b"F1", b"T0"], b"xy"),
    Request(b"mn", []),
]


def _all(parser: Parser) -> list[Request | Refused]:
    out: list[Request | Refused] = []
    while (r := parser.next()) is not None:
        out.append(r)
    return out


def test_requests_are_whole_however_the_bytes_are_split() -> None:
    rng = random.Random(7)
    for _ in range(200):
        parser = Parser(1024, 1024)
        got: list[Request | Refused] = []
        i = 0
        while i < len(STREAM):
            step = rng.randint(1, 7)
            parser.feed(STREAM[i : i + step])
            got += _all(parser)
            i += step
        assert got == EXPECTED


def test_a_bad_data_chunk_is_consumed_and_refused() -> None:
    parser = Parser(1024, 1024)
    parser.feed(b"set a 0 0 2 noreply\r\nabc\r\nget a\r\n")
    first, second, third = _all(parser)
    assert first == Refused(b"CLIENT_ERROR bad data chunk\r\n", noreply=True)
    assert second == Refused(b"ERROR\r\n")  # the extra "c"
    assert third == Request(b"get", [b"a"])


def test_a_value_past_the_limit_is_thrown_away_across_reads() -> None:
    parser = Parser(1024, 10)
    parser.feed(b"set a 0 0 20\r\n0123456789")
    assert _all(parser) == []
    parser.feed(b"0123456789\r\nversion\r\n")
    assert _all(parser) == [
        Refused(b"SERVER_ERROR object too large for cache\r\n"),
        Request(b"version", []),
    ]


def test_bad_lengths_and_long_lines() -> None:
    parser = Parser(16, 10)
    parser.feed(b"set a 0 0 -1\r\nset a 0 0\r\n")
    assert _all(parser) == [Refused(b"CLIENT_ERROR bad command line format\r\n")] * 2
    parser.feed(b"get " + b"k" * 40)
    assert _all(parser) == [Refused(b"CLIENT_ERROR line too long\r\n", close=True)]


@pytest.mark.parametrize(
    ("value", "flags", "document"),
    [
        (b'{"a":1}', 0, b'{"a":1}'),
        (b"42", 0, b"42"),
        (b'{"a": 1}', 0, b'{"$memcached":{"flags":0,"text":"{\\"a\\": 1}"}}'),
        (b'{"a":1}', 2, b'{"$memcached":{"flags":2,"text":"{\\"a\\":1}"}}'),
        (b"\x00\xff", 0, b'{"$memcached":{"base64":"AP8=","flags":0}}'),
        (b"", 0, b'{"$memcached":{"flags":0,"text":""}}'),
    ],
)
def test_items_as_documents(value: bytes, flags: int, document: bytes) -> None:
    assert encode(value, flags, 1 << 20) == document
    assert decode(document) == (value, flags)


def test_every_byte_value_round_trips() -> None:
    singles = [bytes([i]) * 3 for i in range(256)]
    for value in (bytes(range(256)), *singles, b"\xc3\xa9t\xc3\xa9", b"x\x00y"):
        for flags in (0, 1, 2**32 - 1):
            assert decode(encode(value, flags, 1 << 20)) == (value, flags)
    # A document shaped like the wrapper, stored by a memcached client, reads back as sent.
    lookalike = b'{"$memcached":{"flags":0,"text":"x"}}'
    assert decode(encode(lookalike, 0, 1 << 20)) == (lookalike, 0)
    # A record that merely resembles the wrapper is a document.
    assert decode(b'{"$memcached":{"flags":"x"}}') == (b'{"$memcached":{"flags":"x"}}', 0)


def test_keys_name_records() -> None:
    assert record_name(b"users:42", "kv") == ("users", "42")
    assert record_name(b"users:a:b", "kv") == ("users", "a:b")
    assert record_name(b"Users:42", "kv") == ("kv", "Users:42")  # not a collection name
    assert record_name(b"plain", "kv") == ("kv", "plain")
    assert record_name(b"users:", "kv") == ("kv", "users:")
    assert record_name(b"k" * 251, "kv") is None
    assert record_name(b"\xff", "kv") is None
    assert record_name(b"a\x01b", "kv") is None
