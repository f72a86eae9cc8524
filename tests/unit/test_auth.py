"""API key parsing (pure logic); what each route needs is in test_routes.py."""

from __future__ import annotations

import pytest

from service.api.auth import ApiKeyError, ApiKeys, Scope


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
