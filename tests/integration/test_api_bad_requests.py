"""Bad requests: each is answered 4xx with the JSON error body and changes nothing, neither
the entries in Redis (a clean one and a pending one) nor the queue."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.config import Settings
from tests.conftest import running_api

MAX_DOCUMENT_BYTES = 1000
JSON = {"Content-Type": "application/json"}
MERGE = {"Content-Type": "application/merge-patch+json"}


@dataclass(frozen=True)
class Bad:
    method: str
    path: str  # "{c}" is this test's collection
    status: int | None  # None: any 4xx
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    accept_patch: bool = False


def big(n: int) -> bytes:
    return b'{"big": "' + b"x" * n + b'"}'


CASES: dict[str, Bad] = {
    # Documents
    "malformed-json": Bad("PUT", "/v1/{c}/k", 400, b'{"a":', JSON),
    "single-quoted-json": Bad("PUT", "/v1/{c}/k", 400, b"{'a': 1}", JSON),
    "empty-body": Bad("PUT", "/v1/{c}/k", 400, b"", JSON),
    "trailing-garbage": Bad("PUT", "/v1/{c}/k", 400, b'{"a": 1} x', JSON),
    "invalid-utf8-body": Bad("PUT", "/v1/{c}/k", None, b'{"a": "\xff"}', JSON),
    "lone-surrogate": Bad("PUT", "/v1/{c}/k", None, b'{"a": "\\ud800"}', JSON),
    "malformed-merge-patch": Bad("PATCH", "/v1/{c}/k", 400, b'{"a":', MERGE),
    "nul-in-string": Bad("PUT", "/v1/{c}/k", 422, b'{"a": "x\\u0000y"}', JSON),
    "nul-in-member-name": Bad("PUT", "/v1/{c}/k", 422, b'{"a\\u0000": 1}', JSON),
    "nul-deep-in-array": Bad("PUT", "/v1/{c}/k", 422, b'[[{"a": ["\\u0000"]}]]', JSON),
    "nul-in-merge-patch": Bad("PATCH", "/v1/{c}/k", 422, b'{"n": {"m": "\\u0000"}}', MERGE),
    "document-too-large": Bad("PUT", "/v1/{c}/k", 413, big(1500), JSON),
    "new-document-too-large": Bad("PUT", "/v1/{c}/new", 413, big(1500), JSON),
    "merge-result-too-large": Bad("PATCH", "/v1/{c}/k", 413, big(990), MERGE),
    "integer-beyond-64-bits": Bad("PUT", "/v1/{c}/k", None, b'{"n": 18446744073709551616}', JSON),
    "integer-10e30": Bad(
        "PUT", "/v1/{c}/k", None, b'{"n": -1000000000000000000000000000000}', JSON
    ),
    # Names
    "collection-uppercase": Bad("PUT", "/v1/Users/k", 422, b"{}", JSON),
    "collection-percent-encoded-uppercase": Bad("PUT", "/v1/%55sers/k", 422, b"{}", JSON),
    "collection-too-long": Bad("PUT", "/v1/" + "a" * 65 + "/k", 422, b"{}", JSON),
    "collection-leading-dash": Bad("PUT", "/v1/-abc/k", 422, b"{}", JSON),
    "collection-leading-underscore": Bad("PUT", "/v1/_abc/k", 422, b"{}", JSON),
    "collection-with-dot": Bad("PUT", "/v1/a.b/k", 422, b"{}", JSON),
    "collection-with-colon": Bad("PUT", "/v1/a%3Ab/k", 422, b"{}", JSON),
    "collection-trailing-newline": Bad("PUT", "/v1/{c}%0A/k", 422, b"{}", JSON),
    "key-513-bytes": Bad("PUT", "/v1/{c}/" + "k" * 513, 422, b"{}", JSON),
    "key-514-bytes-utf8": Bad("PUT", "/v1/{c}/" + "%C3%A9" * 257, 422, b"{}", JSON),
    "key-control-01": Bad("PUT", "/v1/{c}/a%01b", 422, b"{}", JSON),
    "key-control-7f": Bad("PUT", "/v1/{c}/a%7Fb", 422, b"{}", JSON),
    "key-control-newline": Bad("PUT", "/v1/{c}/a%0Ab", 422, b"{}", JSON),
    "key-invalid-utf8-ff": Bad("PUT", "/v1/{c}/%FF", 422, b"{}", JSON),
    "key-truncated-utf8": Bad("PUT", "/v1/{c}/a%C3", 422, b"{}", JSON),
    "key-invalid-utf8-on-get": Bad("GET", "/v1/{c}/%FE", 422),
    "key-invalid-utf8-on-delete": Bad("DELETE", "/v1/{c}/%FF", 422),
    "empty-key": Bad("PUT", "/v1/{c}/", None, b"{}", JSON),
    "three-segments-put": Bad("PUT", "/v1/{c}/k/x", 404, b"{}", JSON),
    "three-segments-get": Bad("GET", "/v1/{c}/k/x", 404),
    # Content types
    "put-text-plain": Bad("PUT", "/v1/{c}/k", 415, b"{}", {"Content-Type": "text/plain"}),
    "put-xml": Bad("PUT", "/v1/{c}/k", 415, b"{}", {"Content-Type": "application/xml"}),
    "patch-as-json": Bad("PATCH", "/v1/{c}/k", 415, b'{"a": 2}', JSON, accept_patch=True),
    "patch-as-text": Bad(
        "PATCH", "/v1/{c}/k", 415, b'{"a": 2}', {"Content-Type": "text/plain"}, True
    ),
    # Headers
    "if-match-garbage-put": Bad("PUT", "/v1/{c}/k", 400, b"{}", {**JSON, "If-Match": "abc"}),
    "if-match-garbage-patch": Bad("PATCH", "/v1/{c}/k", 400, b"{}", {**MERGE, "If-Match": "W/"}),
    "if-match-garbage-delete": Bad("DELETE", "/v1/{c}/k", 400, None, {"If-Match": '"1'}),
    "if-none-match-garbage-put": Bad(
        "PUT", "/v1/{c}/k", 400, b"{}", {**JSON, "If-None-Match": "1, 2"}
    ),
    "if-none-match-garbage-get": Bad("GET", "/v1/{c}/k", 400, None, {"If-None-Match": "x"}),
    "write-mode-unknown-put": Bad("PUT", "/v1/{c}/k", 400, b"{}", {**JSON, "Write-Mode": "later"}),
    "write-mode-unknown-delete": Bad("DELETE", "/v1/{c}/k", 400, None, {"Write-Mode": "aside"}),
    # Invalidation
    "invalidate-no-collection": Bad("POST", "/v1/invalidate", 422, b'{"keys": ["absent"]}', JSON),
    "invalidate-bad-collection": Bad("POST", "/v1/invalidate", 422, b'{"collection": "A!"}', JSON),
    "invalidate-keys-not-a-list": Bad(
        "POST", "/v1/invalidate", 422, b'{"collection": "{c}", "keys": "absent"}', JSON
    ),
    "invalidate-keys-not-strings": Bad(
        "POST", "/v1/invalidate", 422, b'{"collection": "{c}", "keys": ["absent", 1]}', JSON
    ),
    "invalidate-key-control-char": Bad(
        "POST",
        "/v1/invalidate",
        422,
        b'{"collection": "{c}", "keys": ["absent", "k\\u0001"]}',
        JSON,
    ),
    "invalidate-body-not-an-object": Bad("POST", "/v1/invalidate", 422, b'["{c}"]', JSON),
    "invalidate-not-json": Bad("POST", "/v1/invalidate", None, b"collection=c", JSON),
    # Routing
    "unknown-route": Bad("GET", "/v2/nothing", 404),
    "unknown-route-under-v1": Bad("GET", "/v1", 404),
    "post-to-a-record": Bad("POST", "/v1/{c}/k", 405, b"{}", JSON),
    "put-to-stats": Bad("PUT", "/v1/stats", 405, b"{}", JSON),
    "delete-healthz": Bad("DELETE", "/healthz", 405),
}


def entry_prefix(settings: Settings) -> str:
    return f"{settings.redis_prefix}e:"


async def snapshot(redis: Any, settings: Settings, api: httpx.AsyncClient) -> dict[Any, Any]:
    """Everything a bad request could change: every entry, the queue, the invalidation
    floors and the dead letters, and what /v1/stats calls pending."""
    p = settings.redis_prefix
    state: dict[Any, Any] = {}
    async for k in redis.scan_iter(match=f"{p}e:*", count=50_000):
        state[k] = await redis.hgetall(k)
    async for k in redis.scan_iter(match=f"{p}f:*", count=50_000):
        state[k] = await redis.get(k)
    state["dirty"] = await redis.zrange(f"{p}dirty", 0, -1, withscores=True)
    state["inflight"] = await redis.hgetall(f"{p}inflight")
    state["dead"] = await redis.hgetall(f"{p}dead")
    state["pending"] = (await api.get("/v1/stats")).json()["pending"]
    return state


@pytest.fixture
async def small_api(
    settings_factory: Callable[..., Settings], redis: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_api(settings_factory(max_document_bytes=MAX_DOCUMENT_BYTES)) as client:
        yield client


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_bad_request_is_4xx_with_json_error_and_changes_nothing(
    case: Bad, small_api: httpx.AsyncClient, redis: Any, settings: Settings
) -> None:
    api = small_api
    c = f"t{uuid.uuid4().hex[:12]}"
    # A pending entry (no worker runs in this test) that the writes below aim at, and a
    # clean one (a cached 404) that an invalidation would drop.
    assert (await api.put(f"/v1/{c}/k", json={"orig": 1})).status_code == 201
    assert (await api.get(f"/v1/{c}/absent")).status_code == 404
    before = await snapshot(redis, settings, api)
    assert before["pending"] == 1
    assert entry_prefix(settings).encode() + f"{c}:absent".encode() in before

    body = None if case.body is None else case.body.replace(b"{c}", c.encode())
    r = await api.request(
        case.method, case.path.replace("{c}", c), content=body, headers=case.headers
    )

    if case.status is None:
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
    else:
        assert r.status_code == case.status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    error = r.json()
    assert set(error) == {"error"}, error
    assert isinstance(error["error"]["code"], str) and error["error"]["code"]
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    if case.accept_patch:
        assert "application/merge-patch+json" in r.headers["accept-patch"]

    assert await snapshot(redis, settings, api) == before
    got = await api.get(f"/v1/{c}/k")
    assert got.json() == {"orig": 1}
    assert got.headers["x-cache"] == "hit"
    assert (await api.get(f"/v1/{c}/absent")).headers["x-cache"] == "hit"
