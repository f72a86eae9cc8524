"""A pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path): a request id
on every response and log line, and the latency histogram by route template."""

from __future__ import annotations

import itertools
import time
import uuid

import orjson
from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as Scope_

from service.adapters.logs import request_id
from service.api.auth import ApiKeys, required_scope
from service.api.metrics import Metrics

# Request ids: a random prefix per process and a counter (unique without a uuid4, which
# costs a getrandom() system call per request).
_ID_PREFIX = uuid.uuid4().hex[:8]
_id_counter = itertools.count(1)


def _next_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


async def _deny(send: Send, status: int, code: str, message: str) -> None:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="wbcache"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _bearer(scope: Scope_) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.partition(b" ")
            token_bytes: bytes = token.strip()
            if kind.lower() == b"bearer" and token_bytes:
                return token_bytes
    return None


class RequestContext:
    def __init__(
        self, app: ASGIApp, metrics: Metrics, api_keys: ApiKeys, metrics_public: bool
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.api_keys = api_keys
        self.metrics_public = metrics_public

    async def _authorized(self, scope: Scope_, send: Send) -> bool:
        needed = required_scope(scope["method"], scope["path"], self.metrics_public)
        if needed is None:
            return True
        token = _bearer(scope)
        has = self.api_keys.scope_of(token) if token is not None else None
        if has is None:
            await _deny(
                send,
                401,
                "unauthorized",
                "Send a valid API key as 'Authorization: Bearer <key>'.",
            )
            return False
        if has < needed:
            await _deny(
                send,
                403,
                "forbidden",
                f"This API key has scope {has.name.lower()}; this request needs "
                f"{needed.name.lower()}.",
            )
            return False
        return True

    async def __call__(self, scope: Scope_, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value.decode("latin-1")[:128]
                break
        rid = rid or _next_request_id()
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500
        header = (b"x-request-id", rid.encode("latin-1"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        try:
            if not self.api_keys.enabled or await self._authorized(scope, send_with_id):
                await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_http(
                scope["method"], template, status, time.perf_counter() - started
            )
            request_id.reset(token)
