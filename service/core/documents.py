"""Documents: one canonical serialization, validation, and JSON merge patch (RFC 7396).

Canonical bytes are orjson with sorted keys. Postgres' jsonb reorders keys and rewrites
numbers, so bytes read back from Postgres are canonicalized the same way; a cache hit and a
miss then answer with identical bytes under the same ETag.
"""

from __future__ import annotations

import json
import math
import operator
import re
from decimal import Decimal
from itertools import accumulate, count
from typing import Any

import orjson

_CANONICAL = orjson.OPT_SORT_KEYS


class DocumentError(ValueError):
    """The body is not a document we can store; ``code`` says which way."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# Numbers: one rule. A number the service cannot keep exactly is refused: an integer
# outside the 64-bit range, or a decimal/exponent number whose value does not survive as
# an IEEE double (orjson would silently round 0.1000000000000000000001 to 0.1, 1e-400 to
# 0.0). Any number of at most 15 significant digits with an exponent of at most 2 digits
# survives, so a body needs the exact check only where a digit starts a run of 16 digits
# and points, or an exponent has 3 digits: this pattern.
_MAYBE_INEXACT = re.compile(rb"\d(?:[\d.]{15,}|[eE][+-]?\d{3})")
# The same test without the regex engine's step per byte (6x faster on a batch body):
# digits and points -> "0", e/E -> "e", signs -> "+", any other byte -> " ", then plain
# substring searches. It finds every match of _MAYBE_INEXACT, and also a run of 16 that
# starts with a point (only inside a string, in valid JSON): the exact check then says no.
_NUMERIC = bytes(
    48 if c in b"0123456789." else 101 if c in b"eE" else 43 if c in b"+-" else 32
    for c in range(256)
)


def _maybe_inexact(body: bytes) -> bool:
    s = body.translate(_NUMERIC)
    return b"0" * 16 in s or b"0e000" in s or b"0e+000" in s


_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1


def _checked_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _UINT_MAX:
        raise DocumentError(
            "invalid_document",
            f"The integer {text[:40]} is outside the 64-bit range this service keeps exactly; "
            "send it as a string.",
        )
    return value


def _checked_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise DocumentError(
            "invalid_document",
            f"The number {text[:40]} is beyond the range of a double (about 1.8e308); "
            "send it as a string.",
        )
    if Decimal(text) != Decimal(repr(value)):
        raise DocumentError(
            "invalid_document",
            f"The number {text[:40]} cannot be kept exactly: as a double it is {value!r}. "
            "Send at most 15 significant digits (or a number that reads back the same), "
            "or send it as a string.",
        )
    return value


def _is_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return False
    return True


def _check_numbers(body: bytes) -> None:
    """Every number token of ``body`` (a valid JSON text), read exactly."""
    json.loads(body, parse_int=_checked_int, parse_float=_checked_float)


# How deep arrays and objects may nest in a document or a merge patch (a scalar is 0, []
# is 1). orjson writes at most 254 levels and reads at most 1024; Python's recursion
# limit sits in between: past this limit, refuse with 422 before anything is written.
MAX_DEPTH = 100
# How deep a batch's documents and patches sit in its body: {"operations": [{...: doc}]}.
BATCH_NESTING = 3

_TOO_DEEP = (
    f"Arrays and objects nest more than {MAX_DEPTH} levels deep; a document or merge patch "
    f"may nest at most {MAX_DEPTH}."
)


_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_PAIRS = bytes.maketrans(b"[{]}", b"(())")  # the body is valid JSON: each pair matches
_PEEL_PASSES = 12


def _deeper_than(body: bytes, limit: int) -> bool:
    """Do the arrays and objects of ``body`` (valid JSON) nest more than ``limit`` deep?
    Read from the bytes at C speed (no Python step per value, no recursion)."""
    s = body
    if b"\\" in s:  # drop escaped backslashes, then escaped quotes: every " left delimits
        s = s.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Brackets and quotes only; a string without brackets leaves "", which changes no
    # bracket's inside/outside parity; then drop the brackets inside strings.
    s = s.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])
    if len(s) <= 2 * limit:  # not even limit + 1 openings
        return False
    # Peel the innermost pairs: one pass of replace removes every "()" that was there
    # before it, so each pass takes exactly one level off the deepest nesting. Gone
    # within P <= limit passes: no deeper than P. Most bodies are gone in a few passes
    # (C speed); what is left after _PEEL_PASSES is measured below.
    peeled = s.translate(_PAIRS)
    for _ in range(min(limit, _PEEL_PASSES)):
        peeled = peeled.replace(b"()", b"")
        if not peeled:
            return False
    # Depth after i brackets = opened - closed = (sum of 2 per opening) - i.
    deepest: int = max(map(operator.sub, accumulate(s.translate(_STEPS)), count(1)))
    return deepest > limit


def parse(body: bytes, nesting: int = 0) -> Any:
    """A request body as JSON, refused (``DocumentError``) if the service could not store
    it as sent. ``nesting``: how deep the documents sit inside the body (a batch's)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson reads at most 1024 levels
            raise DocumentError("too_deep", _TOO_DEEP) from exc
        if _maybe_inexact(body) and _is_json(body):
            _check_numbers(body)  # orjson refuses 1e400, valid JSON: say what to fix
        raise DocumentError("malformed_json", f"The body is not valid JSON: {exc}") from exc
    # Nesting: counting brackets (C speed) rules out almost every body before the walk.
    limit = MAX_DEPTH + nesting
    if body.count(b"[") + body.count(b"{") > limit and _deeper_than(body, limit):
        raise DocumentError("too_deep", _TOO_DEEP)
    # orjson rounds numbers it cannot hold (integers beyond 64 bits become floats): refuse
    # them (the cheap byte test rules out almost every body).
    if _maybe_inexact(body):
        _check_numbers(body)
    return value


def loads(stored: bytes) -> Any:
    """A document this service stored (canonical bytes): checked when it came in."""
    return orjson.loads(stored)


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, option=_CANONICAL)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _as_postgres_prints(value: Any) -> Any:
    """Numbers as jsonb's numeric gives them back: no negative zero, and integral floats
    printed in exponent form (1e+16) come back as integers, which orjson reads as ints
    when they fit 64 bits."""
    if isinstance(value, float):
        if value == 0.0:
            return 0.0
        if abs(value) >= 1e16 and value.is_integer() and _INT_MIN <= value <= _UINT_MAX:
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _as_postgres_prints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_postgres_prints(v) for v in value]
    return value


# Bytes (ints) that a text searched for in every document contains: ``int in bytes`` is a
# memchr, while ``bytes in bytes`` first tries the needle as an integer and clears the
# TypeError (~0.5 µs per search on a 200-byte document, three searches per document).
_MINUS, _PLUS, _BACKSLASH = b"-+\\"


def canonical(value: Any, max_bytes: int) -> bytes:
    """Serialize ``value`` canonically and check that Postgres jsonb can hold it."""
    try:
        out = dumps(value)
        # Store what a read back from Postgres gives, so a hit and a miss send one body.
        if (_MINUS in out and b"-0.0" in out) or (_PLUS in out and b"e+" in out):
            out = dumps(_as_postgres_prints(value))
    except TypeError as exc:  # e.g. integers beyond 64 bits
        raise DocumentError("invalid_document", f"The document cannot be stored: {exc}") from exc
    # jsonb refuses \u0000; the cheap byte test rules out almost every document.
    if _BACKSLASH in out and b"\\u0000" in out and _has_nul(value):
        raise DocumentError(
            "invalid_document", "Documents cannot contain the NUL character (\\u0000)."
        )
    if len(out) > max_bytes:
        raise DocumentError(
            "too_large", f"The document is {len(out)} bytes; the limit is {max_bytes} bytes."
        )
    return out


def from_postgres(text: str) -> bytes:
    """Canonical bytes of a jsonb value read as text."""
    return dumps(orjson.loads(text))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396: objects merge recursively, null removes a member, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result: dict[str, Any] = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), value)
    return result
