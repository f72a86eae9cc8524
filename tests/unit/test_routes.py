"""One route table: every route declares what it needs, and the records lane serves exactly
the record operations FastAPI registers (and documents) from the same table."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import Match

from service.api import errors
from service.api.app import create_app
from service.api.auth import (
    ADMIN,
    METRICS,
    PUBLIC,
    READ,
    WRITE,
    ApiKeys,
    Guard,
    Requirement,
    ScopedRoute,
    requires,
)
from service.api.lane import BATCH_PATH, LANE, lane_route
from service.config import Settings

APP = create_app(Settings())


def _routes() -> list[APIRoute]:
    found: list[APIRoute] = []
    for route in APP.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is None:
            if isinstance(route, APIRoute):
                found.append(route)
            continue
        found.extend(c.original_route for c in contexts() if isinstance(c.original_route, APIRoute))
    return found


def _scope(method: str, path: str, root_path: str = "") -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "root_path": root_path, "headers": []}


def requirement(method: str, path: str, root_path: str = "") -> Requirement | None:
    """What a request needs, found the way the app finds it: the lane, else the routes."""
    scope = _scope(method, path, root_path)
    lane = lane_route(scope)
    if lane is not None:
        return lane[1]
    return declared(scope)


def declared(scope: dict[str, Any]) -> Requirement | None:
    """What FastAPI's routes declare for a request."""
    for route in _routes():
        if route.matches(scope)[0] is Match.FULL:
            return route.requirement if isinstance(route, ScopedRoute) else PUBLIC
    return None  # unmatched: a 404 for everyone


def test_every_api_route_declares_its_requirement() -> None:
    undeclared = [
        (r.path, r.methods)
        for r in _routes()
        if not isinstance(r, ScopedRoute) and r.path not in ("/docs", "/redoc")
    ]
    assert undeclared == []


def test_a_route_without_a_declaration_is_refused() -> None:
    async def endpoint() -> None:
        return None

    with pytest.raises(TypeError, match="declare"):
        ScopedRoute("/v1/new", endpoint)


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("GET", "/v1/users/alice", READ),
        ("HEAD", "/v1/users/alice", READ),
        ("PUT", "/v1/users/alice", WRITE),
        ("PATCH", "/v1/users/alice", WRITE),
        ("DELETE", "/v1/users/alice", WRITE),
        # Collections whose names begin like an admin route are records like any other.
        ("GET", "/v1/invalidated/k", READ),
        ("PUT", "/v1/invalidated/k", WRITE),
        ("GET", "/v1/dead-letters-x/k", READ),
        ("DELETE", "/v1/dead-letters-x/k", WRITE),
        ("GET", "/v1/invalidate/k", READ),
        ("GET", "/v1/stats", READ),
        ("GET", "/v1/config", READ),
        ("POST", "/v1/batch", WRITE),
        ("POST", "/v1/invalidate", ADMIN),
        ("GET", "/v1/dead-letters", ADMIN),
        ("POST", "/v1/dead-letters:retry", ADMIN),
        ("POST", "/v1/dead-letters:drop", ADMIN),
        ("GET", "/metrics", METRICS),
        ("GET", "/healthz", PUBLIC),
        ("GET", "/readyz", PUBLIC),
        ("GET", "/docs", PUBLIC),
        ("GET", "/dashboard", PUBLIC),
        # One segment under /v1 is a collection: its listing (GET /v1/{collection}).
        ("GET", "/v1/users", READ),
        ("GET", "/nothing-here", None),
        ("GET", "/v2/nothing-here", None),
    ],
)
def test_declared_requirements(method: str, path: str, needed: Requirement | None) -> None:
    assert requirement(method, path) == needed
    # Under a mount point (uvicorn --root-path puts it in front of the path), the same.
    assert requirement(method, "/api" + path, root_path="/api") == needed


def test_the_lane_serves_exactly_the_record_operations_and_the_batch_of_the_schema() -> None:
    schema = APP.openapi()
    lane_paths = ("/v1/{collection}/{key}", BATCH_PATH)
    documented = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if path in lane_paths
    }
    served = {(method, "/v1/{collection}/{key}") for method in LANE} | {("POST", BATCH_PATH)}
    assert served == documented
    # The lane asks of each request what FastAPI's route declares.
    for method, path in served:
        scope = _scope(method, path.replace("{collection}", "c").replace("{key}", "k"))
        lane = lane_route(scope)
        assert lane is not None and lane[1] == declared(scope), (method, path)
    # And every other operation of the schema is one the lane leaves to FastAPI.
    for path, operations in schema["paths"].items():
        if path not in lane_paths:
            concrete = path.replace("{collection}", "c").replace("{key}", "k")
            for method in operations:
                assert lane_route(_scope(method.upper(), concrete)) is None, (method, path)


async def test_the_declaration_enforces_on_a_plain_route_too() -> None:
    """``requires`` is a real dependency: on a route that is not a ScopedRoute it still
    refuses (after the body is read, which is why our routers use ScopedRoute)."""
    app = FastAPI()
    app.state.guard = Guard(ApiKeys.parse("r:read,a:admin"), metrics_public=True)
    errors.install(app)

    @app.get("/x", dependencies=[requires(ADMIN)])
    async def x() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/x")
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="wbcache"'
        assert r.json()["error"]["code"] == "unauthorized"
        r = await client.get("/x", headers={"Authorization": "Bearer r"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await client.get("/x", headers={"Authorization": "Bearer a"})
        assert r.status_code == 200 and r.json() == {"ok": "yes"}
