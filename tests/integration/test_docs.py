"""/docs works offline, and the OpenAPI schema documents every endpoint."""

from __future__ import annotations

import re

import httpx


async def test_docs_assets_are_served_by_the_app(api: httpx.AsyncClient) -> None:
    for page in ("/docs", "/redoc"):
        r = await api.get(page)
        assert r.status_code == 200
        urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
        assert urls, page
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            assert (await api.get(url)).status_code == 200, url


async def test_every_endpoint_has_summary_and_error_schema(api: httpx.AsyncClient) -> None:
    schema = (await api.get("/openapi.json")).json()
    assert "ErrorBody" in schema["components"]["schemas"]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            assert op.get("summary"), f"{method} {path} has no summary"
            assert "4XX" in op["responses"], f"{method} {path} has no error schema"
            if method in ("put", "patch"):
                content = op["requestBody"]["content"]
                assert any("example" in c for c in content.values()), f"{method} {path}"
