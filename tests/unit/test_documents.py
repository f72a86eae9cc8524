"""Canonical serialization and RFC 7396 merge patch (pure logic, no I/O)."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from service.core import documents
from service.core.documents import DocumentError


def test_canonical_sorts_keys_so_postgres_round_trip_is_stable() -> None:
    doc = {"bb": 1, "a": [1.5, 1e20, {"z": None, "y": "é"}], "c": -0.0, "d": -0.0e-5}
    canon = documents.canonical(doc, 10_000)
    # jsonb text of the same value: keys reordered by length, spaces, numbers rewritten.
    jsonb_text = (
        '{"a": [1.5, 100000000000000000000, {"y": "é", "z": null}], "c": 0.0, "d": 0.0, "bb": 1}'
    )
    assert documents.from_postgres(jsonb_text) == canon


@pytest.mark.parametrize(
    "value",
    [{"k": "a\x00b"}, {"a\x00": 1}, ["x", ["\x00"]]],
)
def test_nul_is_refused(value: Any) -> None:
    with pytest.raises(DocumentError) as exc:
        documents.canonical(value, 10_000)
    assert exc.value.code == "invalid_document"


def test_escaped_backslash_u0000_text_is_not_nul() -> None:
    value = {"k": "\\u0000"}  # a backslash followed by u0000: fine for jsonb
    assert documents.canonical(value, 10_000) == orjson.dumps(value)


def test_size_limit_applies_to_canonical_bytes() -> None:
    with pytest.raises(DocumentError) as exc:
        documents.canonical({"k": "x" * 100}, 50)
    assert exc.value.code == "too_large"


def test_integers_beyond_64_bits_are_refused_or_parsed() -> None:
    with pytest.raises(DocumentError):
        documents.canonical(2**70, 1000)


def test_malformed_json() -> None:
    with pytest.raises(DocumentError) as exc:
        documents.parse(b"{nope")
    assert exc.value.code == "malformed_json"


# RFC 7396 Appendix A, the whole table.
RFC7396_EXAMPLES: list[tuple[Any, Any, Any]] = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


@pytest.mark.parametrize(("target", "patch", "expected"), RFC7396_EXAMPLES)
def test_merge_patch_rfc7396_examples(target: Any, patch: Any, expected: Any) -> None:
    assert documents.merge_patch(target, patch) == expected


def test_merge_patch_does_not_mutate_target() -> None:
    target = {"a": {"b": 1}}
    documents.merge_patch(target, {"a": {"b": 2}})
    assert target == {"a": {"b": 1}}


def test_numbers_as_postgres_prints_them() -> None:
    # jsonb prints 1e16..1e19 as integers (read back as ints) and has no negative zero.
    value = [1e15, 1e16, 1.5e17, 1e19, 1e20, -1e19, -0.0, 1e-7]
    canon = documents.canonical(value, 10_000)
    as_jsonb = "[1000000000000000.0, 10000000000000000, 150000000000000000, "
    as_jsonb += "10000000000000000000, 100000000000000000000, -10000000000000000000, 0.0, "
    as_jsonb += "0.0000001]"
    assert documents.from_postgres(as_jsonb) == canon


def test_integers_beyond_64_bits_in_a_body_are_refused() -> None:
    with pytest.raises(DocumentError) as exc:
        documents.parse(b'{"n": 18446744073709551616}')
    assert exc.value.code == "invalid_document"
    assert documents.parse(b'{"n": 18446744073709551615, "s": "12345678901234567890123"}') == {
        "n": 18446744073709551615,
        "s": "12345678901234567890123",
    }
    assert documents.parse(b"-9223372036854775808") == -(2**63)


def nested(depth: int, leaf: bytes = b"1") -> bytes:
    """``depth`` levels of alternating objects and arrays around ``leaf``."""
    body = leaf
    for i in range(depth):
        body = b'{"a":' + body + b"}" if i % 2 else b"[" + body + b"]"
    return body


def test_depth_up_to_the_limit_is_accepted() -> None:
    value = documents.parse(nested(documents.MAX_DEPTH))
    assert documents.canonical(value, 1 << 20) == nested(documents.MAX_DEPTH)
    assert documents.parse(nested(documents.MAX_DEPTH + 3), nesting=3) is not None


@pytest.mark.parametrize("depth", [documents.MAX_DEPTH + 1, 255, 1000, 1024, 1025, 5000])
def test_deeper_than_the_limit_is_refused(depth: int) -> None:
    with pytest.raises(DocumentError) as exc:
        documents.parse(nested(depth))
    assert exc.value.code == "too_deep"
    assert str(documents.MAX_DEPTH) in exc.value.message


def test_deep_body_with_long_integers_is_too_deep_not_a_recursion_error() -> None:
    with pytest.raises(DocumentError) as exc:
        documents.parse(nested(1000, b"123456789012345678901234567890"))
    assert exc.value.code == "too_deep"


def test_many_brackets_in_a_shallow_body_are_fine() -> None:
    # Past the cheap bracket count, the real walk decides: wide is not deep.
    wide = [{"a": [i]} for i in range(1000)]
    assert documents.parse(orjson.dumps(wide)) == wide
    text = {"s": "[{" * 500}  # brackets inside strings do not nest anything
    assert documents.parse(orjson.dumps(text)) == text


# Numbers: one rule. What the service cannot keep exactly is refused.
@pytest.mark.parametrize(
    "text",
    [
        "0.1000000000000000000001",  # orjson would round it to 0.1
        "1.0000000000000001",
        "9007199254740993.0",  # 2**53 + 1 is no double
        "123456789.1234567891",
        "1.2345678901234567891e-5",
        "12345678901234567891e5",
        "1e400",
        "-1E+400",
        "1e-400",  # underflows to 0.0
        "18446744073709551616",  # 2**64
        "-9223372036854775809",  # -2**63 - 1
    ],
)
def test_numbers_the_service_cannot_keep_exactly_are_refused(text: str) -> None:
    for body in (text, f'{{"a": [1, {{"n": {text}}}]}}'):
        with pytest.raises(DocumentError) as exc:
            documents.parse(body.encode())
        assert exc.value.code == "invalid_document"
        assert text[:20] in exc.value.message


@pytest.mark.parametrize(
    "text",
    [
        "0.1",
        "0.30000000000000004",  # 17 digits, and exactly what a double reads back as
        "1.7976931348623157e308",
        "2.2250738585072014e-308",
        "5e-324",
        "1.0000000000000000",  # the value is 1
        "1234567890123456.0",
        "1e22",
        "1E-99",
        "0e5000",
        "-0.0",
        "1796080422510643",  # integers within 64 bits, however long
        "18446744073709551615",
        "-9223372036854775808",
    ],
)
def test_numbers_kept_exactly_are_accepted(text: str) -> None:
    value = documents.parse(text.encode())
    assert float(value) == float(text)
    assert documents.parse(f'{{"n": "{text}0000000000000000001"}}'.encode())  # a string


def test_the_number_rule_does_not_hide_malformed_json() -> None:
    for body in (b'{"a": nope, "b": 1e400}', b'{"a": 1.00000000000000000001, "b": nope}'):
        with pytest.raises(DocumentError) as exc:
            documents.parse(body)
        assert exc.value.code == "malformed_json", body


def _depth(value: Any) -> int:
    children = value.values() if isinstance(value, dict) else value
    if not isinstance(value, dict | list):
        return 0
    return 1 + max((_depth(v) for v in children), default=0)


def test_depth_read_from_bytes_matches_the_values() -> None:
    # Strings full of brackets, quotes and backslashes must not count as nesting.
    rng = random.Random(7)
    strings = ["", "a[{", '\\"]', "\\\\", 'x\\\\"}', '["""', "{\\u005c"]

    def make(depth: int) -> Any:
        r = rng.random()
        if depth <= 0 or r < 0.3:
            return rng.choice([1, 2.5, None, True, *strings])
        if r < 0.65:
            return [make(depth - 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(strings) + str(i): make(depth - 1) for i in range(rng.randint(0, 3))}

    for _ in range(3000):
        value = make(rng.randint(0, 12))
        body, depth = orjson.dumps(value), _depth(value)
        for limit in (0, 1, 2, 3, 5, 8):
            assert documents._deeper_than(body, limit) == (depth > limit), (body, limit)


def test_the_fast_number_test_finds_what_the_pattern_finds() -> None:
    """``_maybe_inexact`` decides whether a body needs the exact number check: it must find
    every match of ``_MAYBE_INEXACT`` (a miss would let orjson round a number silently);
    finding more only costs the exact check."""
    rng = random.Random(11)
    alphabet = b'0123456789..eE+-- x"[,'
    for _ in range(20000):
        body = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        if documents._MAYBE_INEXACT.search(body):
            assert documents._maybe_inexact(body), body
    for body in (b"[1234567890123456]", b"1.234567890123456", b"[1e400]", b"-1E-400", b"9e+999"):
        assert documents._MAYBE_INEXACT.search(body) and documents._maybe_inexact(body)
    for body in (b"123456789012345", b"1e40", b"[1.5, 2e-10]", b'{"e": "0e00"}'):
        assert not documents._maybe_inexact(body)


def test_depth_past_the_peeling_passes_is_measured_exactly() -> None:
    """Bodies whose brackets are not all peeled within ``_PEEL_PASSES`` are measured by the
    running sum: the answer is the same on both sides of that number."""
    rng = random.Random(3)
    for _ in range(400):
        depth = rng.randint(0, 2 * documents._PEEL_PASSES + 4)
        value: Any = rng.choice([1, "[", None])
        for _ in range(depth):
            value = [value, {"a": []}] if rng.random() < 0.5 else {"k": value, "s": "]}"}
        body, actual = orjson.dumps(value), _depth(value)
        for limit in range(max(0, actual - 2), actual + 3):
            assert documents._deeper_than(body, limit) == (actual > limit), (actual, limit)
