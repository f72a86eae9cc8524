"""API keys end to end: each scope, each failure, open health endpoints."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.config import Settings
from tests.conftest import running_api

KEYS = "rk:read,wk:write,ak:admin"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("key", "put", "get", "invalidate"),
    [
        (None, 401, 401, 401),
        ("wrong", 401, 401, 401),
        ("rk", 403, 404, 403),
        ("wk", 201, 200, 403),
        ("ak", 201, 200, 200),
    ],
)
async def test_scopes(
    settings_factory: Callable[..., Settings],
    key: str | None,
    put: int,
    get: int,
    invalidate: int,
    pg: object,
    redis: object,
) -> None:
    settings = settings_factory(api_keys=KEYS, metrics_public=False)
    headers = bearer(key) if key else {}
    async with running_api(settings) as api:
        r = await api.put("/v1/c/k", json={"a": 1}, headers=headers)
        assert r.status_code == put, r.text
        if put in (401, 403):
            assert r.json()["error"]["code"] in ("unauthorized", "forbidden")
        if put == 401:
            assert r.headers["www-authenticate"].startswith("Bearer")
        r = await api.get("/v1/c/k", headers=headers)
        assert r.status_code == get
        r = await api.post("/v1/invalidate", json={"collection": "c"}, headers=headers)
        assert r.status_code == invalidate
        r = await api.get("/metrics", headers=headers)
        assert r.status_code == (200 if key in ("rk", "wk", "ak") else 401)
        # Health and readiness stay open.
        assert (await api.get("/healthz")).status_code == 200
        assert (await api.get("/readyz")).status_code == 200


async def test_malformed_authorization_is_401(
    settings_factory: Callable[..., Settings], pg: object, redis: object
) -> None:
    async with running_api(settings_factory(api_keys=KEYS)) as api:
        for value in ("Basic rk", "Bearer", "rk", "Bearer  "):
            r = await api.get("/v1/c/k", headers={"Authorization": value})
            assert r.status_code == 401, value
        # The key is never echoed back.
        r = await api.get("/v1/c/k", headers=bearer("secret-guess"))
        assert "secret-guess" not in r.text


async def test_unset_keys_mean_open(api: object) -> None:
    import httpx

    assert isinstance(api, httpx.AsyncClient)
    assert (await api.put("/v1/c/open", json=1)).status_code == 201
