"""The records hot path, ahead of FastAPI's ASGI stack.

GET, HEAD, PUT, PATCH and DELETE of ``/v1/{collection}/{key}`` go from uvicorn straight to
RequestContext (request id, API keys, latency histogram) and the record handler. Every
other request takes FastAPI's full stack, where the same handlers are also registered
(for the OpenAPI schema and /docs) but never reached for these methods.

Skipped per request, each measured on the profile of a PUT under wrk (docs/performance.md):
FastAPI's native-telemetry check (it asks OpenTelemetry for its providers, which reads
the environment), ServerErrorMiddleware, ExceptionTelemetryMiddleware,
AppBodyLimitMiddleware (the handlers enforce their own limit), ExceptionMiddleware,
AsyncExitStackMiddleware, route matching and the request_response wrappers, each of which
adds a coroutine call and a ``send`` wrapper. The errors those layers would have turned
into responses are answered here by the same function FastAPI's handlers use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.errors import answer
from service.api.records import delete_record, get_record, patch_record, put_record

Handler = Callable[[Request], Awaitable[Response]]
HANDLERS: dict[str, Handler] = {
    "GET": get_record,
    "HEAD": get_record,
    "PUT": put_record,
    "PATCH": patch_record,
    "DELETE": delete_record,
}


class RecordRoute:
    """What ``scope["route"]`` holds for a record request: the latency histogram's label."""

    path = "/v1/{collection}/{key:anything}"


RECORD_ROUTE = RecordRoute()


def route_path(scope: Scope) -> str:
    """The path without the mount point (``--root-path``), as Starlette's routing sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def is_record_request(scope: Scope) -> bool:
    """``/v1/<collection>/<anything>``: no other route has a second segment under /v1."""
    if scope["type"] != "http" or scope["method"] not in HANDLERS:
        return False
    path = route_path(scope)
    return path.startswith("/v1/") and path.find("/", 4) > 4


async def serve_record(scope: Scope, receive: Receive, send: Send) -> None:
    scope["route"] = RECORD_ROUTE
    handler = HANDLERS[scope["method"]]
    try:
        response = await handler(Request(scope, receive, send))
    except Exception as exc:
        response = answer(exc)
    await response(scope, receive, send)


class WbcacheApp(FastAPI):
    """FastAPI with the records lane in front (set ``records_lane`` after creating it)."""

    records_lane: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.records_lane is not None and is_record_request(scope):
            scope["app"] = self  # what Request.app reads (the handlers use app.state)
            await self.records_lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)
