"""/v1/{collection}/{key}: PUT, PATCH, GET, HEAD, DELETE.

``ROUTES`` at the end is the one table of record operations: FastAPI's routes (the OpenAPI
schema, /docs) are registered from it, and the records lane (service/api/lane.py) serves
the same methods with the same handlers and the same declared requirements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, replace
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from service.api.auth import READ, WRITE, Requirement, ScopedRoute, requires
from service.api.cache_headers import CACHE_STATUS_HIT, CACHE_STATUS_MISS
from service.api.errors import ERROR_RESPONSES, ApiError, error_response, json_response
from service.api.http import (
    COLLECTION_RE,
    MAX_KEY_BYTES,
    etag,
    is_json,
    none_match_hits,
    parse_match,
    read_body,
    record_name,
)
from service.api.state import AppState
from service.config import WriteMode
from service.core import documents, surrogate
from service.core.record_types import Op, Preconditions, Status, WriteCall, WriteResult
from service.core.redis_keys import member
from service.core.write_through import Outcome

router = APIRouter(
    prefix="/v1", tags=["records"], responses=ERROR_RESPONSES, route_class=ScopedRoute
)


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


def write_mode(state: AppState, header: str | None, collection: str) -> WriteMode:
    """A write's mode: the request's Write-Mode header if it has one, else the collection's
    configured default (COLLECTION_WRITE_MODE), else write-behind. Single-key routes and
    every operation of a batch decide it here."""
    if header is None:
        return state.settings.collection_write_mode.get(collection, "behind")
    mode = header.strip().lower()
    if mode == "behind":
        return "behind"
    if mode == "through":
        return "through"
    raise ApiError(400, "bad_write_mode", "Write-Mode must be 'behind' or 'through'.")


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
    outcome = await state.write_through(
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


async def put_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    if not is_json(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "Send the document as application/json.")
    pre = _preconditions(request)
    mode = write_mode(state, request.headers.get("write-mode"), collection)
    body = await read_body(request, state.settings.max_document_bytes * 4 + 4096)
    doc = documents.canonical(documents.parse(body), state.settings.max_document_bytes)
    call = WriteCall(Op.PUT, collection, key, doc, pre)
    result = await state.store.write(call)
    if overflow_through(state, result):
        result = await state.store.write(replace(call, force=True))
        mode = "through"
    check_write(result)
    if mode == "through":
        await persist_through(state, collection, key, result.version)
    return json_response(
        {"collection": collection, "key": key, "version": result.version},
        201 if result.created else 200,
        {"ETag": etag(result.version)},
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
    mode = write_mode(state, request.headers.get("write-mode"), collection)
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
        {"ETag": etag(result.version), "Cache-Control": state.cache_headers.found(collection)},
        media_type="application/json",
    )


async def get_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    inm = parse_match(request.headers.get("if-none-match"), "If-None-Match")
    record = await state.store.read(collection, key)
    # X-Cache is kept for existing clients; Cache-Status (RFC 9211) is the form a proxy in
    # front extends with its own entry, so the two caches cannot be confused.
    headers = (
        {"X-Cache": "hit", "Cache-Status": CACHE_STATUS_HIT}
        if record.hit
        else {"X-Cache": "miss", "Cache-Status": CACHE_STATUS_MISS}
    )
    # Named on 404s too: a create purges the 404 an edge may hold.
    headers["Surrogate-Key"] = surrogate.header(collection, key)
    if record.document is None:
        headers["Cache-Control"] = state.cache_headers.not_found(collection)
        return error_response(404, "not_found", "No such record.", headers)
    headers["ETag"] = etag(record.version)
    headers["Cache-Control"] = state.cache_headers.found(collection)
    if record.dead_lettered:
        headers["X-Dead-Letter"] = "true"
    if none_match_hits(inm, record.version):
        return Response(status_code=304, headers=headers)
    return Response(record.document, 200, headers, media_type="application/json")


async def delete_record(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: this is the hot path
    collection, key = record_name(request)
    pre = _preconditions(request)
    mode = write_mode(state, request.headers.get("write-mode"), collection)
    call = WriteCall(Op.DELETE, collection, key, pre=pre)
    result = await state.store.write(call)
    if overflow_through(state, result):
        result = await state.store.write(replace(call, force=True))
        mode = "through"
    check_write(result)
    if mode == "through":
        await persist_through(state, collection, key, result.version)
    return Response(status_code=204, headers={"ETag": etag(result.version)})


Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class RecordRoute:
    """One record operation: what the lane serves and what the schema documents."""

    method: str
    endpoint: Endpoint
    requirement: Requirement
    summary: str
    _: KW_ONLY
    status_code: int | None = None
    operation_id: str | None = None
    openapi_extra: dict[str, Any] | None = None


ROUTES: tuple[RecordRoute, ...] = (
    RecordRoute(
        "PUT",
        put_record,
        WRITE,
        "Create or replace a record",
        status_code=200,
        openapi_extra=_PUT_BODY,
    ),
    RecordRoute(
        "PATCH",
        patch_record,
        WRITE,
        "Merge-patch a record (RFC 7396)",
        openapi_extra=_PATCH_BODY,
    ),
    RecordRoute("GET", get_record, READ, "Read a record (cache-aside)", operation_id="get_record"),
    RecordRoute(
        "HEAD", get_record, READ, "A record's headers, no body", operation_id="head_record"
    ),
    RecordRoute("DELETE", delete_record, WRITE, "Delete a record", status_code=204),
)

# The handlers read both names from the raw path (``http.record_name``), so FastAPI sees no
# parameters to document: they are declared here, for clients generated from the schema.
_PATH_PARAMETERS: list[dict[str, Any]] = [
    {
        "name": "collection",
        "in": "path",
        "required": True,
        "description": "1-64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit.",
        "schema": {"type": "string", "pattern": COLLECTION_RE.pattern, "maxLength": 64},
    },
    {
        "name": "key",
        "in": "path",
        "required": True,
        "description": f"One path segment: 1-{MAX_KEY_BYTES} bytes of UTF-8 after "
        "percent-decoding, no control characters. Percent-encode '/' as %2F: it is part "
        "of the key, not a separator.",
        "schema": {"type": "string", "minLength": 1},
    },
]


def _openapi_extra(route: RecordRoute) -> dict[str, Any]:
    return {**(route.openapi_extra or {}), "parameters": [dict(p) for p in _PATH_PARAMETERS]}


for _route in ROUTES:
    router.add_api_route(
        PATH,
        _route.endpoint,
        methods=[_route.method],
        dependencies=[requires(_route.requirement)],
        status_code=_route.status_code,
        responses=_ERRORS,
        summary=_route.summary,
        operation_id=_route.operation_id,
        openapi_extra=_openapi_extra(_route),
    )
