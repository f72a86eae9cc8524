"""A pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): a request id
on every response and log line, and the latency histogram by route template. Who may do
what is each route's declaration (service/api/auth.py)."""

from __future__ import annotations

import itertools
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.adapters.logs import request_id
from service.api.metrics import Metrics

# Request ids: a random prefix per process and a counter (unique without a uuid4, which
# costs a getrandom() system call per request).
_ID_PREFIX = uuid.uuid4().hex[:8]
_id_counter = itertools.count(1)


# A client's X-Request-ID is taken only when it cannot forge anything where it is copied
# (log lines, JSON logs, response headers); otherwise the request gets an id of ours.
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _SAFE_REQUEST_ID.fullmatch(value):
                    rid = value.decode("ascii")
                break
        rid = rid or _next_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 0
        header = (b"x-request-id", rid.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            # Returned without answering: the client left first (nginx's 499).
            status = status or 499
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_http(
                scope["method"], template, status, time.perf_counter() - started
            )
            request_id.reset(token)
