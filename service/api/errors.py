"""One JSON error body for every 4xx/5xx the application produces:
``{"error": {"code": str, "message": str}}``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field
from redis.exceptions import RedisClusterException, RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from service.core.documents import DocumentError
from service.core.errors import ReplicasUnconfirmed, Unavailable, classify

log = logging.getLogger("wbcache.api")

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    412: "precondition_failed",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    428: "precondition_required",
    500: "internal_error",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    code: str = Field(examples=["precondition_failed"])
    message: str = Field(examples=['The record\'s current ETag is "1795695250531747"; ...'])


class ErrorBody(BaseModel):
    """The body of every 4xx/5xx the application produces."""

    error: ErrorDetail


# For the OpenAPI schema of every router.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Client error (JSON error body)"},
    "5XX": {"model": ErrorBody, "description": "Unavailable dependency or backpressure"},
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """An error answer; ``no-store`` unless ``headers`` say otherwise (a record's 404 of a
    collection whose policy lets edges keep it briefly): no cache may keep an error."""
    merged = {"Cache-Control": "no-store", **(headers or {})}
    return json_response({"error": {"code": code, "message": message}}, status, merged)


def json_response(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(body), status_code=status, headers=headers, media_type="application/json"
    )


# A document the service cannot store, by DocumentError.code (also per batch operation).
DOCUMENT_STATUS = {"malformed_json": 400, "too_large": 413, "invalid_document": 422}


def unavailable_message(exc: Unavailable) -> str:
    if isinstance(exc, ReplicasUnconfirmed):  # not "cannot serve": says what the write did
        return exc.detail
    return f"{exc.dependency.capitalize()} cannot serve this now ({exc.detail}); retry later."


class _Unanswered(Response):
    """For a client that left before its request was read: nothing to send, and nobody to
    send it to (uvicorn closes the connection; RequestContext counts it as 499)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        return None


def response_for(exc: Exception) -> Response | None:
    """The response for the errors handlers raise on purpose and for dependency failures
    (``classify``: 503 + Retry-After); None for any other exception (a bug: 500). Used by
    FastAPI's handlers and by the records lane."""
    if isinstance(exc, ClientDisconnect):
        log.info("the client disconnected before sending its whole request; not answered")
        return _Unanswered()
    if isinstance(exc, ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, DocumentError):
        return error_response(DOCUMENT_STATUS.get(exc.code, 422), exc.code, exc.message)
    unavailable = classify(exc)
    if unavailable is not None:
        headers = {"Retry-After": str(unavailable.retry_after)}
        if isinstance(unavailable, ReplicasUnconfirmed):
            headers["ETag"] = f'"{unavailable.version}"'  # the write the primary holds
        return error_response(503, unavailable.code, unavailable_message(unavailable), headers)
    return None


def unexpected_response(exc: Exception) -> Response:
    return error_response(500, "internal_error", f"Unexpected error: {type(exc).__name__}")


def answer(exc: Exception) -> Response:
    """What an exception that reached the edge becomes; a bug is logged with its traceback."""
    response = response_for(exc)
    if response is None:
        log.error("unexpected error", exc_info=exc)
        response = unexpected_response(exc)
    return response


def install(app: FastAPI) -> None:
    async def _expected(_: Request, exc: Exception) -> Response:
        return answer(exc)

    # Dependency errors by their base classes: ``classify`` decides (503 or a bug's 500).
    # Handled here, in ExceptionMiddleware, not by ServerErrorMiddleware, which re-raises.
    for kind in (
        ClientDisconnect,
        ApiError,
        DocumentError,
        Unavailable,
        RedisError,
        RedisClusterException,  # redis-py's Cluster client: SlotNotCoveredError and others
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
        OSError,
    ):
        app.add_exception_handler(kind, _expected)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(exc.status_code, "error")
        if exc.status_code == 404:
            message = "No such route. Records live at /v1/{collection}/{key}."
        elif exc.status_code == 405:
            message = f"This method is not allowed here ({exc.detail})."
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, code, message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "Invalid request.")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return unexpected_response(exc)
