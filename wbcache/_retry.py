"""When to send a call again, and after how long: shared by Client and AsyncClient."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from wbcache._calls import Call, error_code, retry_after
from wbcache.errors import TransportError

T = TypeVar("T")

# Failures before the request left the client: nothing reached the server, so even a
# non-idempotent call may be sent again.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True, slots=True)
class Retries:
    """``attempts`` more sends at most after the first; waits ``Retry-After`` when the API
    says (a 503), else ``backoff`` seconds doubling per attempt. A wait the API asks for
    beyond ``max_wait`` is not waited: the 503 is raised (as ``Unavailable``) at once."""

    attempts: int = 3
    backoff: float = 0.2
    max_wait: float = 30.0

    def _backoff(self, attempt: int) -> float:
        return float(min(self.max_wait, self.backoff * 2**attempt))

    def after_response(
        self, call: Call[Any], response: httpx.Response, attempt: int
    ) -> float | None:
        """Seconds to wait before sending ``call`` again after ``response``, or None to
        take the answer as it is."""
        if response.status_code != 503 or not call.idempotent or attempt >= self.attempts:
            return None
        if error_code(response) == "not_persisted":
            return None  # accepted and queued: sending it again would only queue it again
        wait = retry_after(response)
        if wait is None:
            return self._backoff(attempt)
        return wait if wait <= self.max_wait else None

    def after_error(
        self, call: Call[Any], error: httpx.TransportError, attempt: int
    ) -> float | None:
        """Seconds to wait before sending ``call`` again after a transport error, or None
        to give up (a call that may have reached the server is sent again only if it is
        idempotent)."""
        if attempt >= self.attempts:
            return None
        if isinstance(error, _NOT_SENT) or call.idempotent:
            return self._backoff(attempt)
        return None


# What a send gave: the answer, or the transport error that stood for it.
Outcome = httpx.Response | httpx.TransportError


def exchange(retries: Retries, call: Call[T]) -> Generator[float, Outcome, T]:
    """The sends of one call, without I/O (each client drives it with its own): yields the
    seconds to wait before each send (0 for the first), is sent what that send gave, and
    returns the parsed answer or raises its typed error."""
    attempt = 0
    outcome = yield 0.0
    while True:
        if isinstance(outcome, httpx.TransportError):
            wait = retries.after_error(call, outcome, attempt)
            if wait is None:
                raise TransportError(f"{type(outcome).__name__}: {outcome}") from outcome
        else:
            wait = retries.after_response(call, outcome, attempt)
            if wait is None:
                return call.parse(outcome)
        attempt += 1
        outcome = yield wait
