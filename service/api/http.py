"""HTTP details of the records API: names from the raw path, bodies with a size limit,
strong ETags and the conditional headers of RFC 9110 §13."""

from __future__ import annotations

import functools
import re
from urllib.parse import unquote_to_bytes

from fastapi import Request

from service.api.errors import ApiError
from service.core.record_types import Match

COLLECTION_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
MAX_COLLECTION_CHARS = 64
MAX_KEY_BYTES = 512
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_ETAG = re.compile(r'\s*(W/)?"([^"]*)"\s*(?:,|$)')
# The only text our ETags hold: a version in decimal, ASCII digits, no leading zero.
_VERSION_TAG = re.compile(r"[1-9][0-9]*")


@functools.lru_cache(maxsize=1024)
def _collection_ok(collection: str) -> bool:
    # fullmatch: with match, "$" also matched before a trailing newline ("users\n").
    return COLLECTION_RE.fullmatch(collection) is not None


def validate_collection(collection: str) -> None:
    # A service sees few collections, each in every request: the answer is remembered
    # (for names no longer than a valid one, so the cache stays small).
    if len(collection) > MAX_COLLECTION_CHARS or not _collection_ok(collection):
        raise ApiError(
            422,
            "invalid_collection",
            "A collection name is 1-64 characters of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit.",
        )


def validate_key(key: str) -> None:
    if key.isascii() and key.isprintable() and 0 < len(key) <= MAX_KEY_BYTES:
        return  # the common key: one byte per character, none a control character
    if not 1 <= len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_BYTES:
        raise ApiError(
            422, "invalid_key", f"A key is 1-{MAX_KEY_BYTES} bytes after percent-decoding."
        )
    if _CONTROL.search(key):
        raise ApiError(422, "invalid_key", "A key cannot contain control characters.")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_key", "A key must be valid UTF-8.") from None


def record_name(request: Request) -> tuple[str, str]:
    """Collection and key from the raw path: uvicorn decodes ``%2F`` into ``/`` (and
    ``%FF``/``%FE`` into the same replacement character), so the routed value is unusable."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    raw = raw.split(b"?", 1)[0]
    root = request.scope.get("root_path", "").encode()
    if root and raw.startswith(root):
        raw = raw[len(root) :]
    parts = raw.split(b"/")
    # ['', 'v1', collection, key]
    if len(parts) != 4 or parts[1] != b"v1":
        raise ApiError(
            404, "not_found", "Records live at /v1/{collection}/{key}; encode '/' in keys as %2F."
        )
    try:
        collection = unquote_to_bytes(parts[2]).decode("utf-8")
    except UnicodeDecodeError:
        collection = ""
    validate_collection(collection)
    key_bytes = unquote_to_bytes(parts[3])
    try:
        key = key_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(
            422, "invalid_key", "A key must be valid UTF-8 after percent-decoding."
        ) from None
    validate_key(key)
    return collection, key


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (uvicorn has no limit)."""
    declared = request.headers.get("content-length")
    too_large = ApiError(413, "too_large", f"The body is larger than the limit of {limit} bytes.")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise ApiError(400, "bad_request", "Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def is_json(content_type: str | None, *, patch: bool = False) -> bool:
    if content_type is None:
        return not patch
    media = content_type.split(";", 1)[0].strip().lower()
    if patch:
        return media == "application/merge-patch+json"
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def etag(version: int) -> str:
    return f'"{version}"'


def parse_match(value: str | None, header: str) -> Match | None:
    """An If-Match / If-None-Match field: ``*`` or a list of entity tags.

    Strong comparison (If-Match) ignores weak tags; weak comparison (If-None-Match) takes
    them, as RFC 9110 §13.1.1-2 say. Both compare opaque-tags character by character, so
    only the exact text we issue names a version: ``"0123"``, ``"+123"`` or ``"١٢٣"`` are
    tags we never issue and match nothing (``int()`` would have read them as 123). For the
    canonical text ``int`` is one-to-one, so the versions compare as the tags would.
    """
    if value is None:
        return None
    if value.strip() == "*":
        return Match(any=True)
    versions: set[int] = set()
    pos = 0
    text = value.strip()
    while pos < len(text):
        m = _ETAG.match(text, pos)
        if not m:
            raise ApiError(400, "bad_request", f"{header} must be '*' or a list of entity tags.")
        weak, tag = m.group(1), m.group(2)
        if _VERSION_TAG.fullmatch(tag) and (header == "If-None-Match" or not weak):
            versions.add(int(tag))
        pos = m.end()
    return Match(versions=frozenset(versions))


def none_match_hits(match: Match | None, version: int | None) -> bool:
    """If-None-Match on GET/HEAD: True when the client's copy is current (answer 304)."""
    if match is None or version is None:
        return False
    return match.any or version in match.versions
