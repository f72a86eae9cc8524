"""The records hot path, ahead of FastAPI's ASGI stack.

The record operations of ``/v1/{collection}/{key}`` (``records.ROUTES``: method, handler,
requirement) go from uvicorn straight to RequestContext (request id, latency histogram),
the route's declared requirement (API keys) and the record handler. Every other request
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

from service.api.auth import Guard, Requirement
from service.api.errors import answer
from service.api.records import PATH, ROUTES, Endpoint, router


class _RouteLabel:
    """What ``scope["route"]`` holds for a record request: the latency histogram's label."""

    path = router.prefix + PATH


RECORD_ROUTE = _RouteLabel()
# method -> (handler, requirement), from the table FastAPI's record routes come from.
LANE: dict[str, tuple[Endpoint, Requirement]] = {
    route.method: (route.endpoint, route.requirement) for route in ROUTES
}


def is_record_request(scope: Scope) -> bool:
    """``/v1/<collection>/<anything>`` below the mount point: no other route has a second
    segment under /v1."""
    if scope["type"] != "http" or scope["method"] not in LANE:
        return False
    path = get_route_path(scope)
    return path.startswith("/v1/") and path.find("/", 4) > 4


class RecordsLane:
    """The record operations without FastAPI's stack, each checked against its declared
    requirement first."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.open = not guard.keys.enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = RECORD_ROUTE
        handler, requirement = LANE[scope["method"]]
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
        if self.records_lane is not None and is_record_request(scope):
            scope["app"] = self  # what Request.app reads (the handlers use app.state)
            await self.records_lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
