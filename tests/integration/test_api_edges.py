"""The API's edges: who may call what (declared per route, under any mount point), and
what the schema, /v1/config, request ids, logs and broken clients show."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import uvicorn

from service.api.app import create_app
from service.config import Settings
from service.dev.embedded import free_port
from tests.conftest import wait_until

KEYS = "rk:read,wk:write,ak:admin"
READ_KEY = {"Authorization": "Bearer rk"}
WRITE_KEY = {"Authorization": "Bearer wk"}
ADMIN_KEY = {"Authorization": "Bearer ak"}


@contextlib.asynccontextmanager
async def served(settings: Settings, root_path: str = "") -> AsyncIterator[httpx.AsyncClient]:
    """The app behind a real uvicorn (httptools), optionally with ``--root-path``: the
    client talks to it as the proxy that strips the mount point does."""
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=free_port(),
        root_path=root_path,
        http="httptools",
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        url = f"http://127.0.0.1:{config.port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield client
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def keyed(
    settings_factory: Callable[..., Settings], pg: Any, redis: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with served(settings_factory(api_keys=KEYS)) as client:
        yield client


def assert_refused(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    code = "unauthorized" if status == 401 else "forbidden"
    assert r.json()["error"]["code"] == code
    if status == 401:
        assert r.headers["www-authenticate"] == 'Bearer realm="wbcache"'


@pytest.mark.parametrize("collection", ["invalidated", "dead-letters-x", "invalidate", "batch"])
async def test_collections_named_like_admin_routes_are_records(
    keyed: httpx.AsyncClient, collection: str
) -> None:
    path = f"/v1/{collection}/k"
    assert (await keyed.put(path, json={"a": 1}, headers=WRITE_KEY)).status_code == 201
    r = await keyed.get(path, headers=READ_KEY)
    assert r.status_code == 200 and r.json() == {"a": 1}
    assert (await keyed.head(path, headers=READ_KEY)).status_code == 200
    assert_refused(await keyed.put(path, json={"a": 2}, headers=READ_KEY), 403)
    assert_refused(await keyed.delete(path, headers=READ_KEY), 403)
    assert_refused(await keyed.get(path), 401)


async def test_admin_routes_need_admin(keyed: httpx.AsyncClient) -> None:
    calls = [
        ("POST", "/v1/invalidate", {"collection": "c"}),
        ("GET", "/v1/dead-letters", None),
        ("POST", "/v1/dead-letters:retry", None),
        ("POST", "/v1/dead-letters:drop", None),
    ]
    for method, path, body in calls:
        for headers, status in ((READ_KEY, 403), (WRITE_KEY, 403), ({}, 401)):
            r = await keyed.request(method, path, json=body, headers=headers)
            assert_refused(r, status)
        r = await keyed.request(method, path, json=body, headers=ADMIN_KEY)
        assert r.status_code == 200, (method, path, r.text)


async def test_refused_before_the_body_is_read(keyed: httpx.AsyncClient) -> None:
    # Malformed JSON from a caller without a key: 401, not FastAPI's 422 for the body.
    r = await keyed.post(
        "/v1/invalidate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_refused(r, 401)
    r = await keyed.post(
        "/v1/invalidate",
        content=b"{not json",
        headers={"content-type": "application/json", **READ_KEY},
    )
    assert_refused(r, 403)


async def test_unmatched_paths_tell_nothing(keyed: httpx.AsyncClient) -> None:
    # No route, no requirement: the same fixed 404 for everyone, keys or not.
    for path in ("/nothing", "/v1", "/nothing/else"):
        for headers in ({}, READ_KEY):
            r = await keyed.get(path, headers=headers)
            assert r.status_code == 404, (path, r.status_code)
            assert r.json() == {
                "error": {
                    "code": "not_found",
                    "message": "No such route. Records live at /v1/{collection}/{key}.",
                }
            }
    # Anything with a record's shape is a record route: no key, no word about the record.
    for path in ("/v1/c/absent", "/v1/c/a/b", "/v1/C/k"):
        assert_refused(await keyed.get(path), 401)


@pytest.mark.parametrize("root_path", ["/api", "/deep/mount"])
async def test_under_a_root_path_a_read_key_cannot_write(
    settings_factory: Callable[..., Settings], pg: Any, redis: Any, root_path: str
) -> None:
    async with served(settings_factory(api_keys=KEYS), root_path) as api:
        assert_refused(await api.put("/v1/c/k", json=1, headers=READ_KEY), 403)
        assert_refused(await api.patch("/v1/c/k", json=1, headers=READ_KEY), 403)
        assert_refused(await api.delete("/v1/c/k", headers=READ_KEY), 403)
        assert_refused(await api.post("/v1/batch", json={}, headers=READ_KEY), 403)
        assert_refused(
            await api.post("/v1/invalidate", json={"collection": "c"}, headers=WRITE_KEY), 403
        )
        assert_refused(await api.get("/v1/stats"), 401)
        assert (await api.put("/v1/c/k", json=1, headers=WRITE_KEY)).status_code == 201
        assert (await api.get("/v1/c/k", headers=READ_KEY)).json() == 1
        assert (await api.get("/v1/stats", headers=READ_KEY)).status_code == 200
        assert (await api.get("/healthz")).status_code == 200


async def test_every_path_parameter_is_declared(api: httpx.AsyncClient) -> None:
    """What an OpenAPI validator, client generator or fuzzer checks first: each ``{name}``
    of a path is a required path parameter of every operation on it, and nothing else is."""
    schema = (await api.get("/openapi.json")).json()
    assert "/v1/{collection}/{key}" in schema["paths"]
    for path, operations in schema["paths"].items():
        names = set(re.findall(r"{([^}]+)}", path))
        for method, operation in operations.items():
            declared = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            assert set(declared) == names, (method, path, sorted(declared))
            for p in declared.values():
                assert p["required"] is True and p["schema"]["type"] == "string", (method, p)
    key = next(
        p
        for p in schema["paths"]["/v1/{collection}/{key}"]["get"]["parameters"]
        if p["name"] == "key"
    )
    assert "%2F" in key["description"]


async def test_config_shows_no_credential(
    settings_factory: Callable[..., Settings], servers: Any, pg: Any, redis: Any
) -> None:
    secret = "Pa55-w0rd"
    redis_url = servers.redis_url.replace("redis://", f"redis://default:{secret}@", 1)
    database_url = f"{servers.database_url}?password={secret}&sslpassword={secret}"
    settings = settings_factory(
        redis_url=redis_url, database_url=database_url, api_keys=f"{secret}:admin"
    )
    async with served(settings) as api:
        r = await api.get("/v1/config", headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 200, r.text
        assert secret not in r.text
        cfg = r.json()
        assert cfg["redis_url"].startswith("redis://default:***@")
        assert "password=***&sslpassword=***" in cfg["database_url"]
        assert cfg["api_keys"] == "***"


FORGED_REQUEST_IDS = [
    'x" level=ERROR msg="forged',
    "two words",
    "line\nlevel=ERROR request_id=admin",
    "k=v",
    "tab\there",
    "{}",
    "a" * 129,
]


async def test_unsafe_request_ids_are_replaced(api: httpx.AsyncClient) -> None:
    for forged in [*FORGED_REQUEST_IDS, "caf\u00e9"]:
        r = await api.get("/v1/c/k", headers=[(b"X-Request-ID", forged.encode())])
        rid = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{16}", rid), (forged, rid)
    for fine in ("a", "req-42", "A.b_c:d-e", "7" * 128):
        assert (await api.get("/healthz", headers={"X-Request-ID": fine})).headers[
            "x-request-id"
        ] == fine


def _json_lines(output: str) -> list[dict[str, Any]]:
    lines = output.splitlines()
    assert lines, "the server logged nothing"
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line, uvicorn's own included
        assert isinstance(entry, dict), line
        assert {"ts", "level", "logger", "request_id", "msg"} <= set(entry), line
        entries.append(entry)
    return entries


async def test_json_logs_of_a_real_server(procs: Callable[..., Any]) -> None:
    api = procs("api", LOG_JSON="true", LOG_LEVEL="DEBUG")
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        assert (await http.put("/v1/logs/k", json={"a": "caf\u00e9"})).status_code == 201
        assert (await http.get("/v1/logs/absent")).status_code == 404
        assert (await http.get("/no/such/route")).status_code == 404
    assert api.terminate(15) is not None
    entries = _json_lines(api.output())
    loggers = {e["logger"] for e in entries}
    assert any(name.startswith("uvicorn") for name in loggers), loggers


async def test_etags_compare_as_text(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/tags/k", json=0)
    version = int(r.headers["etag"].strip('"'))
    for n, unissued in enumerate(("0{v}", "+{v}", "{v}.0", "00{v}"), start=1):
        tag = '"' + unissued.format(v=version) + '"'
        r = await api.put("/v1/tags/k", json=-1, headers={"If-Match": tag})
        assert r.status_code == 412, (tag, r.text)
        r = await api.patch(
            "/v1/tags/k",
            json={"a": 2},
            headers={"If-Match": tag, "Content-Type": "application/merge-patch+json"},
        )
        assert r.status_code == 412, (tag, r.text)
        assert (await api.delete("/v1/tags/k", headers={"If-Match": tag})).status_code == 412
        r = await api.get("/v1/tags/k", headers={"If-None-Match": tag})
        assert r.status_code == 200 and r.json() == n - 1, (tag, r.status_code)
        r = await api.post(
            "/v1/batch",
            json={
                "operations": [
                    {"op": "put", "collection": "tags", "key": "k", "document": -1, "if_match": tag}
                ]
            },
        )
        assert r.json()["results"][0]["status"] == 412, r.text
        # If-None-Match naming no version: the record is not "current", the PUT goes on.
        r = await api.put("/v1/tags/k", json=n, headers={"If-None-Match": tag})
        assert r.status_code == 200, r.text
        version = int(r.headers["etag"].strip('"'))
    # Latin-1 digits that int() refuses: a tag like any other, not a 500.
    r = await api.put("/v1/tags/k", json=-1, headers=[(b"If-Match", b'"\xb2"')])
    assert r.status_code == 412, r.text
    r = await api.get("/v1/tags/k", headers={"If-None-Match": f'"{version}"'})
    assert r.status_code == 304
    assert (await api.get("/v1/tags/k")).json() == 4


async def _send_partial(
    port: int, method: str, path: str, request_id: str, media: str = "application/json"
) -> None:
    """Headers announcing 1,000 bytes, then 10 of them, then the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {media}\r\n"
        f"Content-Length: 1000\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    writer.write(head.encode() + b'{"a": "xxx')
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.close()
    await writer.wait_closed()


async def test_a_client_that_leaves_mid_body_is_no_error(procs: Callable[..., Any]) -> None:
    api = procs("api", LOG_JSON="true")
    forged = 'x" level=ERROR msg="forged=1'
    calls = [
        ("PUT", "/v1/gone/k", "application/json"),  # the records lane
        ("PATCH", "/v1/gone/k", "application/merge-patch+json"),
        ("POST", "/v1/batch", "application/json"),  # a FastAPI route reading its own body
        ("POST", "/v1/invalidate", "application/json"),  # FastAPI reads this body (400)
    ]
    for method, path, media in calls:
        await _send_partial(api.port, method, path, forged, media)

    async def logged() -> bool:
        output: str = api.output()
        answered = output.count("disconnected before sending its whole request")
        return answered >= 3 or output.count("Traceback") >= 2

    await wait_until(logged)
    async with httpx.AsyncClient(base_url=api.url, timeout=10) as http:
        assert (await http.get("/v1/gone/k")).status_code == 404  # nothing was written
        assert (await http.get("/v1/stats")).json()["pending"] == 0
        metrics = (await http.get("/metrics")).text
    api.stop()
    output = api.output()
    assert "Traceback" not in output and "forged" not in output, output
    entries = _json_lines(output)
    assert not [e for e in entries if e["level"] in ("ERROR", "CRITICAL")], output
    for e in entries:
        if "disconnected" in e["msg"]:
            assert e["level"] == "INFO" and re.fullmatch(r"[0-9a-f]{16}", e["request_id"])
    assert 'status="499"' in metrics  # counted as the client's doing, not a 500
