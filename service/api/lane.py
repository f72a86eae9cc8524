"""The records hot path, ahead of FastAPI's ASGI stack.

The record operations of ``/v1/{collection}/{key}`` (``records.ROUTES``: method, handler,
requirement) and ``POST /v1/batch`` go from uvicorn straight to RequestContext (request
id, latency histogram), the route's declared requirement (API keys) and the handler
(a batch of 100 writes spends a tenth of its CPU in the layers skipped). Every other request
takes FastAPI's full stack, where the same table registers the same handlers (for the
OpenAPI schema and /docs) that are never reached for these methods. The path is read
below the mount point (``--root-path``) with Starlette's own ``get_route_path``.

Skipped per request, each measured on the profile of a PUT under wrk (docs/performance.md):
FastAPI's native-telemetry check (it asks OpenTelemetry for its providers, which reads
the environment), ServerErrorMiddleware, ExceptionTelemetryMiddleware,
AppBodyLimitMiddleware (the handlers enforce their own limit), ExceptionMiddleware,
AsyncExitStackMiddleware, route matching and the request_response wrappers, each of which
adds a coroutine call and a ``send`` wrapper. The errors those layers would have turned
into responses are answered here by the same function FastAPI's handlers use.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette._utils import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import batch
from service.api.auth import WRITE, Guard, Requirement
from service.api.errors import answer
from service.api.records import PATH, ROUTES, Endpoint, router


class _RouteLabel:
    """What ``scope["route"]`` holds for a lane request: the latency histogram's label."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


RECORD_ROUTE = _RouteLabel(router.prefix + PATH)
BATCH_PATH = batch.router.prefix + "/batch"
# (handler, requirement, label) by method, from the table FastAPI's record routes come
# from; and the batch route's, which FastAPI declares with the same requirement.
LANE: dict[str, tuple[Endpoint, Requirement, _RouteLabel]] = {
    route.method: (route.endpoint, route.requirement, RECORD_ROUTE) for route in ROUTES
}
BATCH = (batch.batch, WRITE, _RouteLabel(BATCH_PATH))


def lane_route(scope: Scope) -> tuple[Endpoint, Requirement, _RouteLabel] | None:
    """The lane's route for ``scope``: ``/v1/<collection>/<anything>`` below the mount
    point (no other route has a second segment under /v1), or ``POST /v1/batch``."""
    if scope["type"] != "http":
        return None
    method = scope["method"]
    if method == "POST":
        return BATCH if get_route_path(scope) == BATCH_PATH else None
    if method not in LANE:
        return None
    path = get_route_path(scope)
    return LANE[method] if path.startswith("/v1/") and path.find("/", 4) > 4 else None


class RecordsLane:
    """The lane's operations without FastAPI's stack, each checked against its declared
    requirement first."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.open = not guard.keys.enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = lane_route(scope)
        assert route is not None  # WbcacheApp sends only the lane's requests here
        handler, requirement, scope["route"] = route
        if not self.open:
            refusal = self.guard.refusal(scope, requirement)
            if refusal is not None:
                await answer(refusal)(scope, receive, send)
                return
        try:
            response = await handler(Request(scope, receive, send))
        except Exception as exc:
            response = answer(exc)
        await response(scope, receive, send)


class WbcacheApp(FastAPI):
    """FastAPI with the records lane in front (set ``records_lane`` after creating it)."""

    records_lane: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.root_path:  # as FastAPI does, before the lane looks at the path
            scope["root_path"] = self.root_path
        if self.records_lane is not None and lane_route(scope) is not None:
            scope["app"] = self  # what Request.app reads (the handlers use app.state)
            await self.records_lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
