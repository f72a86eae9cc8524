"""What a memcached item is in the store: its key as a record's name, its value and flags as
a document (docs/memcached.md, "Representation").

- A value stored with flags 0 that is exactly the canonical JSON of a document (what HTTP
  GET answers: orjson, sorted keys, no spaces) is stored as that document: HTTP clients
  read it as any record, and memcached clients get the same bytes back.
- Any other value (pickles, compressed blobs, text, JSON in another spelling, any flags)
  is stored as ``{"$memcached": {"flags": F, "text": "..."}}`` when it is UTF-8 without NUL
  (readable over HTTP), else ``{"$memcached": {"base64": "...", "flags": F}}``; memcached
  clients get the exact bytes and flags back.
- A record whose document is an object with the single member ``$memcached`` holding
  ``flags`` and ``text`` or ``base64`` reads back through memcached as those bytes (so HTTP
  clients can write one); any other record reads back as its canonical JSON, flags 0.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from service.api.errors import ApiError
from service.api.http import validate_collection
from service.core import documents

WRAPPER = "$memcached"
_WRAPPED = b'{"' + WRAPPER.encode() + b'":'
# First bytes of a canonical JSON text: a value starting otherwise is not one (no parse).
_JSON_START = frozenset(b'{["-0123456789tfn')
MAX_FLAGS = 2**32 - 1
MAX_KEY_BYTES = 250  # memcached's own limit (protocol.txt, "Keys")


class TooLarge(ValueError):
    """The item's document exceeds MAX_DOCUMENT_BYTES."""


def encode(value: bytes, flags: int, max_bytes: int) -> bytes:
    """The document (canonical bytes) that stores ``value`` with ``flags``."""
    if flags == 0 and value and value[0] in _JSON_START:
        plain = _as_document(value, max_bytes)
        if plain is not None:
            return plain
    inner: dict[str, Any] = {"flags": flags}
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and "\x00" not in text:  # jsonb refuses \u0000
        inner["text"] = text
    else:
        inner["base64"] = base64.b64encode(value).decode("ascii")
    try:
        return documents.canonical({WRAPPER: inner}, max_bytes)
    except documents.DocumentError as exc:
        raise TooLarge(exc.message) from exc


def _as_document(value: bytes, max_bytes: int) -> bytes | None:
    """``value`` itself when it is a document's canonical JSON (and not shaped like the
    wrapper, which would read back as other bytes), else None."""
    if value.startswith(_WRAPPED):
        return None
    try:
        out = documents.canonical(documents.parse(value), max_bytes)
    except documents.DocumentError:
        return None
    return out if out == value else None


def decode(document: bytes) -> tuple[bytes, int]:
    """The value and flags a record's document stands for."""
    if document.startswith(_WRAPPED):
        unwrapped = _unwrap(document)
        if unwrapped is not None:
            return unwrapped
    return document, 0


def _unwrap(document: bytes) -> tuple[bytes, int] | None:
    try:
        outer = orjson.loads(document)
    except orjson.JSONDecodeError:
        return None
    inner = outer.get(WRAPPER) if isinstance(outer, dict) and len(outer) == 1 else None
    if not isinstance(inner, dict):
        return None
    flags = inner.get("flags", 0)
    if type(flags) is not int or not 0 <= flags <= MAX_FLAGS:
        return None
    text, b64 = inner.get("text"), inner.get("base64")
    if isinstance(text, str) and b64 is None:
        return text.encode("utf-8"), flags
    if isinstance(b64, str) and text is None:
        try:
            return base64.b64decode(b64, validate=True), flags
        except (binascii.Error, ValueError):
            return None
    return None


def record_name(key: bytes, default_collection: str) -> tuple[str, str] | None:
    """The record a memcached key names: ``collection:key`` when the part before the first
    ``:`` is a valid collection name and the rest is not empty, else the whole key in
    ``default_collection``. None for a key memcached itself refuses (over 250 bytes,
    control characters) or that is not UTF-8."""
    if len(key) > MAX_KEY_BYTES or not key:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.isprintable():
        return None
    collection, sep, rest = text.partition(":")
    if sep and rest:
        try:
            validate_collection(collection)
        except ApiError:
            pass
        else:
            return collection, rest
    return default_collection, text
