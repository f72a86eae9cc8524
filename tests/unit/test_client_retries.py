"""Which calls the client may send twice, and how long it waits (no I/O)."""

from __future__ import annotations

from typing import Any

import httpx

from wbcache import _calls
from wbcache._retry import Retries


def answer(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


def test_only_idempotent_calls_are_retried_after_a_503() -> None:
    retries = Retries(attempts=2, max_wait=10)
    full = answer(503, **{"Retry-After": "3"})
    assert retries.after_response(_calls.put("c", "k", {}, None, None, None), full, 0) == 3
    assert retries.after_response(_calls.delete("c", "k", None, None), full, 1) == 3
    assert retries.after_response(_calls.patch("c", "k", {}, None, None), full, 0) is None
    assert retries.after_response(_calls.patch("c", "k", {}, '"7"', None), full, 0) == 3
    unsafe: list[dict[str, Any]] = [
        {"op": "put"},
        {"op": "patch", "collection": "c", "key": "k", "patch": {}},
    ]
    assert retries.after_response(_calls.batch(unsafe, None), full, 0) is None
    unsafe[1]["if_match"] = '"7"'
    assert retries.after_response(_calls.batch(unsafe, None), full, 0) == 3
    # Bounded: no third retry; a wait beyond max_wait is not waited; other errors stand.
    get = _calls.get("c", "k", None)
    assert retries.after_response(get, full, 2) is None
    assert retries.after_response(get, answer(503, **{"Retry-After": "60"}), 0) is None
    assert retries.after_response(get, answer(500), 0) is None
    assert retries.after_response(get, answer(503), 1) == 0.4  # no Retry-After: backoff
    # A write-through the API accepted and queued but Postgres did not commit in time:
    # sending it again would only queue it again.
    queued = httpx.Response(
        503,
        headers={"Retry-After": "1"},
        json={"error": {"code": "not_persisted", "message": "queued"}},
    )
    assert (
        retries.after_response(_calls.put("c", "k", {}, None, None, "through"), queued, 0) is None
    )


def test_a_request_never_sent_may_be_sent_again() -> None:
    retries = Retries(attempts=1)
    patch = _calls.patch("c", "k", {}, None, None)
    request = httpx.Request("PATCH", "http://x/v1/c/k")
    assert retries.after_error(patch, httpx.ConnectError("refused", request=request), 0) == 0.2
    assert retries.after_error(patch, httpx.ReadTimeout("lost", request=request), 0) is None
    get = _calls.get("c", "k", None)
    assert retries.after_error(get, httpx.ReadTimeout("lost", request=request), 0) == 0.2
    assert retries.after_error(get, httpx.ReadTimeout("lost", request=request), 1) is None
