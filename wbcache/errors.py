"""The client's exceptions, one class per answer a caller handles differently, mapped from
the API's error body ``{"error": {"code": str, "message": str}}`` and its status."""

from __future__ import annotations


class WbcacheError(Exception):
    """Any failure the client reports. ``status`` is the HTTP status (0 when no answer
    came), ``code`` the API's error code, ``message`` what the API says to fix."""

    def __init__(self, message: str, *, status: int = 0, code: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    def __str__(self) -> str:
        where = f"{self.status} {self.code}: " if self.status else ""
        return f"{where}{self.message}"


class TransportError(WbcacheError):
    """No answer: the connection failed or timed out (after the retries it allowed)."""


class BadRequest(WbcacheError):
    """400: malformed JSON or a bad header."""


class Unauthorized(WbcacheError):
    """401: no API key, or an unknown one."""


class Forbidden(WbcacheError):
    """403: the API key's scope is too small for the request."""


class NotFound(WbcacheError):
    """404: the record is absent or deleted (or the path is unknown)."""


class PreconditionFailed(WbcacheError):
    """412: ``if_match`` / ``if_none_match`` did not hold. ``etag`` is the record's current
    ETag when the API names it."""

    def __init__(self, message: str, *, status: int = 412, code: str = "", etag: str | None = None):
        super().__init__(message, status=status, code=code)
        self.etag = etag


class TooLarge(WbcacheError):
    """413: the document or batch is over the service's limit."""


class Invalid(WbcacheError):
    """422 (or 415): an invalid collection, key, document or parameter."""


class Unavailable(WbcacheError):
    """503: backpressure (MAX_PENDING) or a dependency down. ``retry_after`` is the wait
    the API asked for, in seconds, if it said."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 503,
        code: str = "",
        retry_after: float | None = None,
        etag: str | None = None,
    ) -> None:
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after
        self.etag = etag


class NotPersisted(Unavailable):
    """503 on a ``write_mode="through"`` write: accepted and queued (``etag`` names its
    version) but not committed to Postgres in time; it will be persisted later."""


class ServerError(WbcacheError):
    """Any other 5xx."""


_BY_STATUS: dict[int, type[WbcacheError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: TooLarge,
    415: Invalid,
    422: Invalid,
}


def error_for(
    status: int,
    code: str,
    message: str,
    *,
    etag: str | None = None,
    retry_after: float | None = None,
) -> WbcacheError:
    """The exception for one error answer (a response, or one operation of a batch)."""
    if status == 412:
        return PreconditionFailed(message, status=status, code=code, etag=etag)
    if status == 503:
        kind = NotPersisted if code == "not_persisted" else Unavailable
        return kind(message, status=status, code=code, retry_after=retry_after, etag=etag)
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else WbcacheError)
    return cls(message, status=status, code=code)
