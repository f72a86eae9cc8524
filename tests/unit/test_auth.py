"""API key parsing and the scope each request needs (pure logic)."""

from __future__ import annotations

import pytest

from service.api.auth import ApiKeyError, ApiKeys, Scope, required_scope


def test_parse_and_scopes() -> None:
    keys = ApiKeys.parse("r1:read, w1:write,a1:admin,with:colon:read")
    assert keys.enabled
    assert keys.scope_of(b"r1") is Scope.READ
    assert keys.scope_of(b"w1") is Scope.WRITE
    assert keys.scope_of(b"a1") is Scope.ADMIN
    assert keys.scope_of(b"with:colon") is Scope.READ
    assert keys.scope_of(b"nope") is None
    assert keys.scope_of(b"r") is None
    assert not ApiKeys.parse("").enabled


@pytest.mark.parametrize("spec", ["justakey", "k:superuser", ":read"])
def test_bad_specs_are_refused(spec: str) -> None:
    with pytest.raises(ApiKeyError):
        ApiKeys.parse(spec)


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/v1/users/alice", Scope.READ),
        ("HEAD", "/v1/users/alice", Scope.READ),
        ("PUT", "/v1/users/alice", Scope.WRITE),
        ("PATCH", "/v1/users/alice", Scope.WRITE),
        ("DELETE", "/v1/users/alice", Scope.WRITE),
        ("GET", "/v1/stats", Scope.READ),
        ("POST", "/v1/invalidate", Scope.ADMIN),
        ("GET", "/v1/dead-letters", Scope.ADMIN),
        ("POST", "/v1/dead-letters:retry", Scope.ADMIN),
        ("GET", "/healthz", None),
        ("GET", "/readyz", None),
        ("GET", "/docs", None),
        ("GET", "/dashboard", None),
    ],
)
def test_required_scope(method: str, path: str, needed: Scope | None) -> None:
    assert required_scope(method, path, metrics_public=True) == needed


def test_metrics_follow_the_setting() -> None:
    assert required_scope("GET", "/metrics", metrics_public=True) is None
    assert required_scope("GET", "/metrics", metrics_public=False) is Scope.READ
