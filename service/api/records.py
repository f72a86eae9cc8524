"""/v1/{collection}/{key}: PUT, PATCH, GET, HEAD, DELETE."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from service.api.errors import ERROR_RESPONSES, ApiError, error_response, json_response
from service.api.http import (
    etag,
    is_json,
    none_match_hits,
    parse_match,
    read_body,
    record_name,
)
from service.api.state import AppState
from service.core import documents
from service.core.flusher import Outcome
from service.core.records import Op, Preconditions, Status, WriteResult
from service.core.redis_keys import member

router = APIRouter(prefix="/v1", tags=["records"], responses=ERROR_RESPONSES)


class _AnyConvertor(Convertor[str]):
    """Like ``path`` but also across control characters (``%0A``), so such keys reach the
    handler and get a clear 422 instead of a routing 404. The handler re-reads the raw path."""

    regex = "[\\s\\S]*"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anything", _AnyConvertor())
PATH = "/{collection}/{key:anything}"
_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "Absent or deleted"},
    412: {"description": "A precondition failed"},
    503: {"description": "Redis unavailable, or backpressure"},
}


def _body(media: str, example: Any) -> dict[str, Any]:
    """The request body in the OpenAPI schema (the handlers read raw bytes)."""
    return {
        "requestBody": {
            "required": True,
            "content": {media: {"schema": {}, "example": example}},
        }
    }


_PUT_BODY = _body("application/json", {"name": "Alice", "roles": ["admin"]})
_PATCH_BODY = _body("application/merge-patch+json", {"roles": None, "email": "a@example.com"})


def _preconditions(request: Request) -> Preconditions:
    return Preconditions(
        if_match=parse_match(request.headers.get("if-match"), "If-Match"),
        if_none_match=parse_match(request.headers.get("if-none-match"), "If-None-Match"),
    )


def _cache_control(state: AppState, collection: str) -> str:
    max_age = state.settings.collection_max_age.get(collection)
    if max_age is None:
        return state.settings.cache_control_default
    return f"private, max-age={max_age}"


def _write_mode(state: AppState, request: Request, collection: str) -> str:
    mode = request.headers.get("write-mode")
    if mode is None:
        return state.settings.collection_write_mode.get(collection, "behind")
    mode = mode.strip().lower()
    if mode not in ("behind", "through"):
        raise ApiError(400, "bad_write_mode", "Write-Mode must be 'behind' or 'through'.")
    return mode


def overflow_through(state: AppState, result: WriteResult) -> bool:
    """Past MAX_PENDING, writes may be configured to go through instead of failing."""
    return result.status is Status.FULL and state.settings.backpressure_mode == "through"


def check_write(result: WriteResult) -> None:
    if result.status is Status.NOT_FOUND:
        raise ApiError(404, "not_found", "No such record.")
    if result.status is Status.PRECONDITION_FAILED:
        raise ApiError(
            412,
            "precondition_failed",
            f"The record's current ETag is {etag(result.version)}; "
            "fetch it and retry with that in If-Match.",
            {"ETag": etag(result.version)} if result.version else None,
        )
    if result.status is Status.FULL:
        raise ApiError(
            503,
            "backpressure",
            "Too many writes are waiting to be persisted (MAX_PENDING); retry shortly.",
            {"Retry-After": "1"},
        )


async def persist_through(state: AppState, collection: str, key: str, version: int) -> None:
    outcome = await state.flusher.write_through(
        member(collection, key), version, state.settings.write_through_timeout
    )
    if outcome is Outcome.TIMEOUT:
        raise ApiError(
            503,
            "not_persisted",
            f"The write (version {version}) is accepted and queued, but Postgres did not "
            f"commit it within {state.settings.write_through_timeout} s; it will be "
            "persisted when Postgres answers.",
            {"Retry-After": "1", "ETag": etag(version)},
        )
    if outcome is Outcome.DEAD:
        raise ApiError(
            422,
            "rejected_by_database",
            f"The write (version {version}) could not be persisted (Postgres refused it, or "
            "it made the service fail); it is in the dead letters, with the error.",
        )


@router.put(
    PATH,
    status_code=200,
    responses=_ERRORS,
    summary="Create or replace a record",
    openapi_extra=_PUT_BODY,
)
async def put_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    if not is_json(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "Send the document as application/json.")
    pre = _preconditions(request)
    mode = _write_mode(state, request, collection)
    body = await read_body(request, state.settings.max_document_bytes * 4 + 4096)
    doc = documents.canonical(documents.parse(body), state.settings.max_document_bytes)
    result = await state.store.write(Op.PUT, collection, key, doc, pre)
    if overflow_through(state, result):
        result = await state.store.write(Op.PUT, collection, key, doc, pre, force=True)
        mode = "through"
    check_write(result)
    if mode == "through":
        await persist_through(state, collection, key, result.version)
    return json_response(
        {"collection": collection, "key": key, "version": result.version},
        201 if result.created else 200,
        {"ETag": etag(result.version)},
    )


@router.patch(
    PATH, responses=_ERRORS, summary="Merge-patch a record (RFC 7396)", openapi_extra=_PATCH_BODY
)
async def patch_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    if not is_json(request.headers.get("content-type"), patch=True):
        raise ApiError(
            415,
            "unsupported_media_type",
            "Send a JSON merge patch with Content-Type: application/merge-patch+json.",
            {"Accept-Patch": "application/merge-patch+json"},
        )
    pre = _preconditions(request)
    mode = _write_mode(state, request, collection)
    body = await read_body(request, state.settings.max_document_bytes * 4 + 4096)
    patch = documents.parse(body)
    result, merged = await state.store.patch(collection, key, patch, pre)
    if overflow_through(state, result):
        result, merged = await state.store.patch(collection, key, patch, pre, force=True)
        mode = "through"
    check_write(result)
    assert merged is not None
    if mode == "through":
        await persist_through(state, collection, key, result.version)
    return Response(
        merged,
        200,
        {"ETag": etag(result.version), "Cache-Control": _cache_control(state, collection)},
        media_type="application/json",
    )


@router.get(
    PATH, responses=_ERRORS, summary="Read a record (cache-aside)", operation_id="get_record"
)
@router.head(
    PATH, responses=_ERRORS, summary="A record's headers, no body", operation_id="head_record"
)
async def get_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    inm = parse_match(request.headers.get("if-none-match"), "If-None-Match")
    record = await state.store.read(collection, key)
    x_cache = "hit" if record.hit else "miss"
    if record.document is None:
        return error_response(404, "not_found", "No such record.", {"X-Cache": x_cache})
    headers = {
        "ETag": etag(record.version),
        "Cache-Control": _cache_control(state, collection),
        "X-Cache": x_cache,
    }
    if record.dead_lettered:
        headers["X-Dead-Letter"] = "true"
    if none_match_hits(inm, record.version):
        return Response(status_code=304, headers=headers)
    return Response(record.document, 200, headers, media_type="application/json")


@router.delete(PATH, status_code=204, responses=_ERRORS, summary="Delete a record")
async def delete_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    pre = _preconditions(request)
    mode = _write_mode(state, request, collection)
    result = await state.store.write(Op.DELETE, collection, key, b"", pre)
    if overflow_through(state, result):
        result = await state.store.write(Op.DELETE, collection, key, b"", pre, force=True)
        mode = "through"
    check_write(result)
    if mode == "through":
        await persist_through(state, collection, key, result.version)
    return Response(status_code=204, headers={"ETag": etag(result.version)})
