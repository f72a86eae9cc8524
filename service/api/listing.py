"""GET /v1/{collection}: a collection's keys in byte order, a page at a time
(service/core/listing.py), writes not yet persisted included, pending deletes not.

The fixed paths under /v1 (stats, config, dead-letters) are routed first: a collection of
one of those names is read and written as any other, but not listed."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request, Response

from service.api.auth import READ, ScopedRoute, requires
from service.api.deps import StateDep
from service.api.errors import ERROR_RESPONSES, ApiError, json_response
from service.api.http import COLLECTION_RE, MAX_KEY_BYTES, validate_collection, validate_key
from service.core.listing import Lister

router = APIRouter(
    prefix="/v1", tags=["records"], responses=ERROR_RESPONSES, route_class=ScopedRoute
)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_KNOWN = {"prefix", "limit", "cursor", "include"}


def encode_cursor(key: str) -> str:
    """Opaque to clients: the last key listed, base64url."""
    return base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        validate_key(key)
    except (binascii.Error, ValueError, ApiError):
        raise ApiError(
            422, "invalid_cursor", "cursor must be a next_cursor this API returned."
        ) from None
    return key


def _limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(422, "invalid_limit", f"limit is an integer from 1 to {MAX_LIMIT}.")
    return int(raw)


def _prefix(raw: str | None) -> str:
    if not raw:
        return ""
    try:
        validate_key(raw)  # a prefix of a key is held to a key's rules
    except ApiError as exc:
        raise ApiError(422, "invalid_prefix", f"prefix: {exc.message}") from None
    return raw


@router.get(
    "/{collection}",
    dependencies=[requires(READ)],
    summary="List a collection's keys in byte order (keyset pagination)",
    responses={422: {"description": "Invalid collection, prefix, limit, cursor or include"}},
)
async def list_collection(
    request: Request,
    state: StateDep,
    # Declared for the schema; validated here, with the error body's messages.
    collection: Annotated[str, Path(description=f"matches {COLLECTION_RE.pattern}")],
    prefix: Annotated[str | None, Query(description=f"at most {MAX_KEY_BYTES} bytes")] = None,
    limit: Annotated[str | None, Query(description=f"1-{MAX_LIMIT}, default 100")] = None,
    cursor: Annotated[str | None, Query(description="a previous page's next_cursor")] = None,
    include: Annotated[str | None, Query(description="'documents': each item's too")] = None,
) -> Response:
    validate_collection(collection)
    params = request.query_params
    unknown = sorted(set(params) - _KNOWN)
    if unknown:
        raise ApiError(
            422, "invalid_parameter", f"unknown parameter {unknown[0]!r}: use {sorted(_KNOWN)}."
        )
    if include not in (None, "documents"):
        raise ApiError(422, "invalid_include", "include takes one value: documents.")
    after = decode_cursor(cursor) if cursor is not None else None
    listing = await Lister(state.redis, state.pg, state.shards).page(
        collection, _prefix(prefix), after, _limit(limit), include == "documents"
    )
    items: list[dict[str, Any]] = []
    for item in listing.items:
        one: dict[str, Any] = {"key": item.key, "version": item.version}
        if item.document is not None:
            one["document"] = orjson.Fragment(item.document)
        items.append(one)
    next_cursor = encode_cursor(listing.items[-1].key) if listing.more else None
    return json_response({"collection": collection, "items": items, "next_cursor": next_cursor})
