"""What Client and AsyncClient share: each operation as a ``Call`` (the request to send,
whether it is safe to send twice, how to read the answer). The two clients differ only in
how they send it and wait between retries."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from wbcache.errors import WbcacheError, error_for
from wbcache.models import BatchResult, Item, Page, Record, Written

T = TypeVar("T")
WriteMode = Literal["behind", "through"]
# An ETag as the API sends it ('"17"'), or the bare version (17).
ETag = str | int


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One request and how to read its answer. ``idempotent``: sending it again after a
    lost answer or a 503 cannot do anything the first send would not have done."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    idempotent: bool
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    params: dict[str, str] | None = None


def retry_after(response: httpx.Response) -> float | None:
    """The Retry-After header in seconds (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    date = response.headers.get("date")
    now = parsedate_to_datetime(date) if date else None
    if now is None:
        now = datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - now).total_seconds())


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """The API's error body as (code, message); a body of another shape (a proxy's page)
    gives no code and the status' reason phrase."""
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "", response.reason_phrase or f"HTTP {response.status_code}"


def error_code(response: httpx.Response) -> str:
    return _error_body(response)[0]


def raise_for_error(response: httpx.Response) -> None:
    """Raise the typed exception for a 4xx/5xx answer."""
    if response.status_code < 400:
        return
    code, message = _error_body(response)
    raise error_for(
        response.status_code,
        code,
        message,
        etag=response.headers.get("etag"),
        retry_after=retry_after(response),
    )


def _path(collection: str, key: str | None = None) -> str:
    # A key is one path segment: '/' and every other reserved byte percent-encoded.
    base = f"/v1/{quote(collection, safe='')}"
    return base if key is None else f"{base}/{quote(key, safe='')}"


def _match(value: ETag | Sequence[ETag]) -> str:
    """An If-Match / If-None-Match value: '*', an ETag, a version, or a list of them."""
    if isinstance(value, (str, int)):
        values: Sequence[ETag] = [value]
    else:
        values = value
    return ", ".join(f'"{v}"' if isinstance(v, int) else v for v in values)


def _version(response: httpx.Response) -> int:
    return int(response.headers["etag"].strip('"'))


def _write_headers(
    if_match: ETag | Sequence[ETag] | None,
    if_none_match: ETag | Sequence[ETag] | None,
    write_mode: WriteMode | None,
) -> dict[str, str]:
    headers: dict[str, str] = {}
    if if_match is not None:
        headers["If-Match"] = _match(if_match)
    if if_none_match is not None:
        headers["If-None-Match"] = _match(if_none_match)
    if write_mode is not None:
        headers["Write-Mode"] = write_mode
    return headers


def dumps(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def get(
    collection: str, key: str, if_none_match: ETag | Sequence[ETag] | None
) -> Call[Record | None]:
    def parse(response: httpx.Response) -> Record | None:
        if response.status_code == 304:
            return None
        raise_for_error(response)
        return Record(collection, key, _version(response), response.json())

    headers = {} if if_none_match is None else {"If-None-Match": _match(if_none_match)}
    return Call("GET", _path(collection, key), parse, idempotent=True, headers=headers)


def put(
    collection: str,
    key: str,
    document: Any,
    if_match: ETag | Sequence[ETag] | None,
    if_none_match: ETag | Sequence[ETag] | None,
    write_mode: WriteMode | None,
) -> Call[Written]:
    def parse(response: httpx.Response) -> Written:
        raise_for_error(response)
        body = response.json()
        return Written(collection, key, int(body["version"]), response.status_code == 201)

    headers = _write_headers(if_match, if_none_match, write_mode)
    headers["Content-Type"] = "application/json"
    # A PUT sent twice leaves the same document: safe to retry.
    return Call("PUT", _path(collection, key), parse, True, headers, dumps(document))


def patch(
    collection: str,
    key: str,
    merge_patch: Any,
    if_match: ETag | Sequence[ETag] | None,
    write_mode: WriteMode | None,
) -> Call[Record]:
    def parse(response: httpx.Response) -> Record:
        raise_for_error(response)
        return Record(collection, key, _version(response), response.json())

    headers = _write_headers(if_match, None, write_mode)
    headers["Content-Type"] = "application/merge-patch+json"
    # A merge patch applied twice can differ from once (a concurrent write in between is
    # overwritten again): only If-Match makes the second send a no-op (412).
    return Call(
        "PATCH", _path(collection, key), parse, if_match is not None, headers, dumps(merge_patch)
    )


def delete(
    collection: str,
    key: str,
    if_match: ETag | Sequence[ETag] | None,
    write_mode: WriteMode | None,
) -> Call[Written]:
    def parse(response: httpx.Response) -> Written:
        raise_for_error(response)
        return Written(collection, key, _version(response))

    headers = _write_headers(if_match, None, write_mode)
    return Call("DELETE", _path(collection, key), parse, True, headers)


def _batch_result(raw: Mapping[str, Any]) -> BatchResult:
    status = int(raw["status"])
    version = raw.get("version")
    error: WbcacheError | None = None
    if "error" in raw:
        error = error_for(status, str(raw["error"]["code"]), str(raw["error"]["message"]))
    return BatchResult(
        status, None if version is None else int(version), raw.get("document"), error
    )


def batch(
    operations: Sequence[Mapping[str, Any]], write_mode: WriteMode | None
) -> Call[list[BatchResult]]:
    def parse(response: httpx.Response) -> list[BatchResult]:
        raise_for_error(response)
        return [_batch_result(r) for r in response.json()["results"]]

    # Safe to send twice only if each write in it is: gets, puts and deletes are; a patch
    # needs its if_match.
    idempotent = all(op.get("op") != "patch" or "if_match" in op for op in operations)
    headers = _write_headers(None, None, write_mode)
    headers["Content-Type"] = "application/json"
    body = dumps({"operations": list(operations)})
    return Call("POST", "/v1/batch", parse, idempotent, headers, body)


def list_page(
    collection: str,
    prefix: str | None,
    limit: int | None,
    cursor: str | None,
    include_documents: bool,
) -> Call[Page]:
    def parse(response: httpx.Response) -> Page:
        raise_for_error(response)
        body = response.json()
        items = [Item(i["key"], int(i["version"]), i.get("document")) for i in body["items"]]
        return Page(collection, items, body["next_cursor"])

    params: dict[str, str] = {}
    if prefix:
        params["prefix"] = prefix
    if limit is not None:
        params["limit"] = str(limit)
    if cursor is not None:
        params["cursor"] = cursor
    if include_documents:
        params["include"] = "documents"
    return Call("GET", _path(collection), parse, True, params=params)


def _json_body(response: httpx.Response) -> dict[str, Any]:
    raise_for_error(response)
    body: dict[str, Any] = response.json()
    return body


def stats() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/stats", _json_body, True)


def invalidate(collection: str, keys: Sequence[str] | None) -> Call[dict[str, Any]]:
    body: dict[str, Any] = {"collection": collection}
    if keys is not None:
        body["keys"] = list(keys)
    headers = {"Content-Type": "application/json"}
    # Dropping clean cached copies twice drops nothing more.
    return Call("POST", "/v1/invalidate", _json_body, True, headers, dumps(body))
