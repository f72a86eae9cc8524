"""POST /v1/batch: up to 1,000 operations (put, patch, delete, get) in one request, each
with its own status, version and error, preconditions per operation, the same guarantees
as the single-key calls. Operations on one key run in the order given; different keys run
concurrently."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from service.api.auth import WRITE, ScopedRoute, requires
from service.api.errors import (
    DOCUMENT_STATUS,
    ERROR_RESPONSES,
    ApiError,
    json_response,
    unavailable_message,
)
from service.api.http import is_json, parse_match, read_body, validate_collection, validate_key
from service.api.records import check_write, overflow_through, persist_through, write_mode
from service.api.state import AppState
from service.core import documents
from service.core.documents import DocumentError
from service.core.errors import ReplicasUnconfirmed, classify
from service.core.record_types import Op, Preconditions, Record, Status, WriteCall, WriteResult

router = APIRouter(
    prefix="/v1", tags=["records"], responses=ERROR_RESPONSES, route_class=ScopedRoute
)

MAX_OPERATIONS = 1000
_OPS = {"put", "patch", "delete", "get"}
_EXAMPLE = {
    "operations": [
        {"op": "put", "collection": "users", "key": "alice", "document": {"name": "Alice"}},
        {"op": "patch", "collection": "users", "key": "bob", "patch": {"age": 31}},
        {"op": "delete", "collection": "users", "key": "carol", "if_match": '"17956952"'},
        {"op": "get", "collection": "users", "key": "dave"},
    ]
}


def _error(status: int, code: str, message: str) -> dict[str, Any]:
    return {"status": status, "error": {"code": code, "message": message}}


def _validate(i: int, op: Any) -> dict[str, Any]:
    if not isinstance(op, dict):
        raise ApiError(422, "invalid_batch", f"operations[{i}] must be an object.")
    kind = op.get("op")
    if kind not in _OPS:
        raise ApiError(422, "invalid_batch", f"operations[{i}].op must be one of {sorted(_OPS)}.")
    for name in ("collection", "key"):
        if not isinstance(op.get(name), str):
            raise ApiError(422, "invalid_batch", f"operations[{i}].{name} must be a string.")
    if kind == "put" and "document" not in op:
        raise ApiError(422, "invalid_batch", f"operations[{i}] (put) needs a document.")
    if kind == "patch" and "patch" not in op:
        raise ApiError(422, "invalid_batch", f"operations[{i}] (patch) needs a patch.")
    for name in ("if_match", "if_none_match"):
        if name in op and not isinstance(op[name], str):
            raise ApiError(422, "invalid_batch", f"operations[{i}].{name} must be a string.")
    return op


async def _run(state: AppState, op: dict[str, Any], through: bool) -> dict[str, Any]:
    kind = op["op"]
    try:
        collection, key = _name(op)
        pre = _preconditions(op)
        max_bytes = state.settings.max_document_bytes
        if kind == "get":
            return _read_result(await state.store.read(collection, key))
        merged: bytes | None = None
        if kind == "put":
            doc = documents.canonical(op["document"], max_bytes)
            call = WriteCall(Op.PUT, collection, key, doc, pre)
            result = await state.store.write(call)
            if overflow_through(state, result):
                result = await state.store.write(replace(call, force=True))
                through = True
        elif kind == "patch":
            result, merged = await state.store.patch(collection, key, op["patch"], pre)
            if overflow_through(state, result):
                result, merged = await state.store.patch(
                    collection, key, op["patch"], pre, force=True
                )
                through = True
        else:
            call = WriteCall(Op.DELETE, collection, key, pre=pre)
            result = await state.store.write(call)
            if overflow_through(state, result):
                result = await state.store.write(replace(call, force=True))
                through = True
        check_write(result)
        if through:
            await persist_through(state, collection, key, result.version)
        out = _write_result(kind, result)
        if merged is not None:
            out["document"] = orjson.Fragment(merged)
        return out
    except Exception as exc:  # the operation's own answer; a bug re-raises
        return _failure(exc)


@router.post(
    "/batch",
    dependencies=[requires(WRITE)],
    summary="Up to 1,000 operations in one request, each with its own result",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {}, "example": _EXAMPLE}},
        }
    },
)
async def batch(request: Request) -> Response:
    state: AppState = request.app.state.wb  # no dependency: the records lane serves it
    if not is_json(request.headers.get("content-type")):
        raise ApiError(415, "unsupported_media_type", "Send the batch as application/json.")
    header = request.headers.get("write-mode")
    write_mode(state, header, "")  # a bad Write-Mode is refused before the body is read
    limit = (state.settings.max_document_bytes + 1024) * 8 + 1024 * 1024
    # Every operation's document and patch is held to the depth limit here, before any
    # operation runs: a batch with one too deep is refused whole.
    body = documents.parse(await read_body(request, limit), nesting=documents.BATCH_NESTING)
    ops = body.get("operations") if isinstance(body, dict) else None
    if not isinstance(ops, list) or not ops:
        raise ApiError(422, "invalid_batch", 'The body is {"operations": [ ... ]}.')
    if len(ops) > MAX_OPERATIONS:
        raise ApiError(
            413, "too_large", f"A batch holds at most {MAX_OPERATIONS} operations ({len(ops)})."
        )
    checked = [_validate(i, op) for i, op in enumerate(ops)]
    # Per operation, as a single-key write to its collection would go (COLLECTION_WRITE_MODE
    # unless the request's Write-Mode says otherwise).
    if header is None and not state.settings.collection_write_mode:
        through = [False] * len(checked)
    else:
        through = [write_mode(state, header, op["collection"]) == "through" for op in checked]

    results = await _execute(state, checked, through)
    return json_response({"results": results})


async def _execute(
    state: AppState, ops: list[dict[str, Any]], through: list[bool]
) -> list[dict[str, Any]]:
    """Same key: in the order given. Different keys: together, in rounds (round r holds
    each key's r-th operation): a round's puts and deletes go to Redis in one pipeline,
    its gets in another; patches (read, merge, compare-and-set) and writes through
    (``through[i]``) run one by one, concurrently."""
    names = [(op["collection"], op["key"]) for op in ops]
    rounds: list[list[int]] = []
    if len(set(names)) == len(names):  # each key once (the common batch): one round
        rounds.append(list(range(len(ops))))
    else:
        by_key: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, name in enumerate(names):
            by_key[name].append(i)
        for indexes in by_key.values():
            for r, i in enumerate(indexes):
                if r == len(rounds):
                    rounds.append([])
                rounds[r].append(i)
    results: list[dict[str, Any]] = [{}] * len(ops)  # each replaced by its result
    gate = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with gate:
            results[i] = await _run(state, ops[i], through[i])

    for indexes in rounds:
        writes, gets, others = [], [], []
        for i in indexes:
            kind = ops[i]["op"]
            if through[i] or kind == "patch":
                others.append(i)
            elif kind == "get":
                gets.append(i)
            else:
                writes.append(i)
        jobs: list[Coroutine[Any, Any, None]] = [one(i) for i in others]
        if writes:
            jobs.append(_pipelined_writes(state, ops, writes, results))
        if gets:
            jobs.append(_pipelined_gets(state, ops, gets, results))
        if len(jobs) == 1:
            await jobs[0]  # no task to gather
        else:
            await asyncio.gather(*jobs)
    return results


def _name(op: dict[str, Any]) -> tuple[str, str]:
    validate_collection(op["collection"])
    validate_key(op["key"])
    return op["collection"], op["key"]


# What most operations carry: no If-Match, no If-None-Match.
_NO_PRECONDITIONS = Preconditions()


def _preconditions(op: dict[str, Any]) -> Preconditions:
    if "if_match" not in op and "if_none_match" not in op:
        return _NO_PRECONDITIONS
    return Preconditions(
        if_match=parse_match(op.get("if_match"), "If-Match"),
        if_none_match=parse_match(op.get("if_none_match"), "If-None-Match"),
    )


def _read_result(record: Record) -> dict[str, Any]:
    if record.document is None:
        return _error(404, "not_found", "No such record.")
    return {"status": 200, "version": record.version, "document": orjson.Fragment(record.document)}


def _write_result(kind: str, result: WriteResult) -> dict[str, Any]:
    status = 204 if kind == "delete" else 201 if result.created else 200
    return {"status": status, "version": result.version}


async def _pipelined_writes(
    state: AppState,
    ops: list[dict[str, Any]],
    indexes: list[int],
    results: list[dict[str, Any]],
) -> None:
    """Write-behind puts and deletes of distinct keys; each gets its own outcome."""
    calls: list[WriteCall] = []
    called: list[int] = []
    max_bytes = state.settings.max_document_bytes
    for i in indexes:
        op = ops[i]
        try:
            collection, key = _name(op)
            pre = _preconditions(op)
            if op["op"] == "put":
                doc = documents.canonical(op["document"], max_bytes)
                calls.append(WriteCall(Op.PUT, collection, key, doc, pre))
            else:
                calls.append(WriteCall(Op.DELETE, collection, key, pre=pre))
            called.append(i)
        except Exception as exc:
            results[i] = _failure(exc)
    try:
        written = await state.store.write_many(calls)
    except Exception as exc:  # the pipeline failed: no write's fate is known
        for i in called:
            results[i] = _failure(exc)
        return
    retry: list[int] = []
    for i, result in zip(called, written, strict=True):
        if isinstance(result, Exception):  # this write alone failed; the others stand
            results[i] = _failure(result)
            continue
        if result.status is not Status.OK:
            if overflow_through(state, result):
                retry.append(i)  # past MAX_PENDING, configured to write through: one by one
                continue
            try:
                check_write(result)
            except ApiError as exc:
                results[i] = _failure(exc)
                continue
        results[i] = _write_result(ops[i]["op"], result)
    for i in retry:
        results[i] = await _run(state, ops[i], through=False)


async def _pipelined_gets(
    state: AppState,
    ops: list[dict[str, Any]],
    indexes: list[int],
    results: list[dict[str, Any]],
) -> None:
    names: list[tuple[str, str]] = []
    asked: list[int] = []
    for i in indexes:
        try:
            names.append(_name(ops[i]))
            asked.append(i)
        except Exception as exc:
            results[i] = _failure(exc)
    try:
        records = await state.store.read_many(names) if names else []
    except Exception as exc:  # the pipeline failed; a bug re-raises in _failure
        for i in asked:
            results[i] = _failure(exc)
        return
    for i, record in zip(asked, records, strict=True):
        results[i] = _failure(record) if isinstance(record, Exception) else _read_result(record)


def _failure(exc: Exception) -> dict[str, Any]:
    """An operation's own error, as the single-key call would have answered it."""
    if isinstance(exc, ApiError):
        return _error(exc.status, exc.code, exc.message)
    if isinstance(exc, DocumentError):
        return _error(DOCUMENT_STATUS.get(exc.code, 422), exc.code, exc.message)
    unavailable = classify(exc)
    if unavailable is not None:
        failure = _error(503, unavailable.code, unavailable_message(unavailable))
        if isinstance(unavailable, ReplicasUnconfirmed):
            failure["version"] = unavailable.version  # what the primary holds
        return failure
    raise exc
