"""uvicorn's httptools protocol with the limits it lacks (it has none for httptools):

- the request head (request line + headers) is at most ``HTTP_MAX_HEADER_BYTES``: past it
  the answer is ``431`` and nothing more of the head is buffered (httptools would otherwise
  grow one header by concatenation, quadratically, for as long as the client sends);
- the head must be complete ``HTTP_HEADER_TIMEOUT_SECONDS`` after the connection opened
  (first request) or after its first byte (later requests): else ``408`` and close;
- the body may pause at most ``HTTP_BODY_TIMEOUT_SECONDS`` between two reads, and must
  keep up ``HTTP_BODY_MIN_RATE`` bytes a second on average past that grace (Apache's
  ``mod_reqtimeout`` rule: a trickle of a byte now and then is no longer a way to hold a
  connection): else ``408`` (or a close, once the application has started answering);
- at most ``HTTP_MAX_CONNECTIONS`` connections are open per process: a new connection
  past it closes the oldest idle one (opened or kept alive without a byte of a request,
  as nginx reuses keep-alive connections), or, when none is idle, is answered ``503``
  with ``Retry-After`` and closed.

Idle keep-alive connections are uvicorn's (``timeout_keep_alive``). The deadlines cost no
timer per request: one watchdog per connection, re-armed lazily, reads a deadline that
the parser callbacks move forward (uvicorn's keep-alive ``call_later`` pattern, made
lazy). A connection refused at the protocol level gets its answer, its write side shut,
and what the client still sends read and dropped for a short while, so the answer is
not lost to a reset."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, NamedTuple

import orjson
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.config import Settings, get_settings

log = logging.getLogger("wbcache.http")

# The connection's place in its current request, as the parser saw it.
_HEAD = 0  # a request line and headers are due (or arriving)
_BODY = 1  # the head is complete, its body is arriving
_IDLE = 2  # no request being read: the last one is complete (keep-alive is uvicorn's)
_DRAIN = 3  # refused: the answer is written, what arrives is dropped until the close

# How long a refused connection keeps reading (and dropping) what the client still sends.
_LINGER_SECONDS = 2.0
# At most one warning per this many seconds while clients are being refused.
_WARN_EVERY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    body_seconds_per_byte: float  # 1 / HTTP_BODY_MIN_RATE
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout=settings.http_header_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
            body_seconds_per_byte=1 / settings.http_body_min_rate,
            max_connections=settings.http_max_connections,
        )


@lru_cache(maxsize=1)
def _process_limits() -> HttpLimits:
    # From the environment, once per process: `serve --workers N` spawns processes that
    # import this class by name, so the limits cannot travel as constructor arguments.
    return HttpLimits.from_settings(get_settings())


class _Refusal(NamedTuple):
    """An answer written by the protocol: its status line, the rest after uvicorn's
    default headers (date, server), and what the log calls it."""

    status_line: bytes
    rest: bytes
    what: str


def _refusal(status: int, code: str, message: str, what: str, *headers: bytes) -> _Refusal:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    rest = [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n",
        *headers,
        b"\r\n",
        body,
    ]
    return _Refusal(STATUS_LINE[status], b"".join(rest), what)


_Base = HttpToolsProtocol  # called directly, not through super(): these run per request


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a head size limit, head/body deadlines and a connection
    cap; pass the class as ``uvicorn.run(..., http=LimitedHttpToolsProtocol)``."""

    # Connections with no request in progress, oldest first: the ones a new connection
    # may close when the cap is reached. One uvicorn server per process (`wbcache serve`).
    _idle: ClassVar[OrderedDict[LimitedHttpToolsProtocol, None]] = OrderedDict()
    _closing_idle: ClassVar[int] = 0  # closed for a newcomer, not yet gone from `connections`
    _refused: ClassVar[dict[str, int]] = {}  # what -> how many since the last warning
    _warned_at: ClassVar[float] = float("-inf")

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, object],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = _process_limits()
        self._phase = _HEAD
        self._head_bytes = 0  # bytes of the current head received so far
        self._messages = 0  # requests read whole on this connection
        self._deadline = 0.0  # when the current phase times out
        self._body_start = 0.0  # when the body began (moved on while reading was paused)
        self._body_bytes = 0  # of the current body, received so far
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        self._linger: asyncio.TimerHandle | None = None
        self._closed_for_newcomer = False

    # Connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        cls = LimitedHttpToolsProtocol
        if len(self.connections) - cls._closing_idle >= self.limits.max_connections:
            if not self._close_oldest_idle():
                self._refuse_connection(transport)
                return
        super().connection_made(transport)
        cls._idle[self] = None
        self._watch(self.loop.time() + self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        LimitedHttpToolsProtocol._idle.pop(self, None)
        if self._closed_for_newcomer:
            self._closed_for_newcomer = False
            LimitedHttpToolsProtocol._closing_idle -= 1
        self._phase = _DRAIN
        for timer in (self._watchdog, self._linger):
            if timer is not None:
                timer.cancel()
        self._watchdog = self._linger = None
        super().connection_lost(exc)

    def _close_oldest_idle(self) -> bool:
        cls = LimitedHttpToolsProtocol
        while cls._idle:
            oldest, _ = cls._idle.popitem(last=False)
            if not oldest.transport.is_closing():
                oldest._closed_for_newcomer = True
                cls._closing_idle += 1
                oldest._phase = _DRAIN
                oldest.transport.close()
                return True
        return False

    def _refuse_connection(self, transport: asyncio.Transport) -> None:
        # Not in `connections`: uvicorn neither counts nor waits for it.
        self.transport = transport
        self._phase = _DRAIN
        self._write(_SERVICE_UNAVAILABLE)
        transport.close()
        self._count(_SERVICE_UNAVAILABLE)

    def _count(self, refusal: _Refusal) -> None:
        """Count a refusal; warn at most every few seconds with the counts since."""
        cls = LimitedHttpToolsProtocol
        cls._refused[refusal.what] = cls._refused.get(refusal.what, 0) + 1
        now = self.loop.time()
        if now - cls._warned_at >= _WARN_EVERY_SECONDS:
            counts = ", ".join(f"{n} {what}" for what, n in cls._refused.items())
            log.warning("HTTP limits: refused since the last warning: %s", counts)
            cls._warned_at = now
            cls._refused.clear()

    # Reading

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _BODY:
            _Base.data_received(self, data)
            if self._phase == _BODY:  # the later of the pause and the pace deadlines
                limits = self.limits
                paced = self._body_start + self._body_bytes * limits.body_seconds_per_byte
                self._deadline = min(self.loop.time(), paced) + limits.body_timeout
            return
        if phase == _DRAIN:
            return
        else:  # a head is due: bound it before the parser buffers any of it
            room = self.limits.max_header_bytes - self._head_bytes
            if len(data) > room:
                self._feed_past_room(data, room)
                return
            self._head_bytes += len(data)
        _Base.data_received(self, data)

    def _feed_past_room(self, data: bytes, room: int) -> None:
        """Feed what fits. If the head it began with is still incomplete, it is too large;
        else the rest belongs to its body or to the next (pipelined) requests, and is
        counted afresh: a head that began within what fitted is counted from the next
        read on, so pipelined heads get at most twice the limit, never more."""
        messages = self._messages
        if room > 0:
            self._head_bytes += room
            _Base.data_received(self, data[:room])
        if self._phase == _DRAIN or self.transport.is_closing():
            return
        if self._phase == _HEAD and self._messages == messages:
            self._refuse_request(_HEADER_TOO_LARGE)
            return
        self.data_received(data[room:])

    # The parser's callbacks run for every request: `_watch` is inlined to its common
    # case (a watchdog already armed to fire no later than the new deadline).

    def on_message_begin(self) -> None:
        LimitedHttpToolsProtocol._idle.pop(self, None)
        if self._phase == _IDLE:  # a later request on a kept-alive connection
            self._phase = _HEAD  # (the first one's deadline runs from the open)
            deadline = self._deadline = self.loop.time() + self.limits.header_timeout
            if self._watchdog is None or deadline < self._watchdog_at:
                self._watch(deadline)
        _Base.on_message_begin(self)

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._body_start = now = self.loop.time()
        self._body_bytes = 0
        deadline = self._deadline = now + self.limits.body_timeout
        if self._watchdog is None or deadline < self._watchdog_at:
            self._watch(deadline)
        _Base.on_headers_complete(self)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        _Base.on_body(self, body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._head_bytes = 0
        self._messages += 1
        _Base.on_message_complete(self)

    def on_response_complete(self) -> None:
        _Base.on_response_complete(self)
        if self.timeout_keep_alive_task is None:
            return  # closing, or a pipelined request started
        if self._phase == _IDLE:
            LimitedHttpToolsProtocol._idle[self] = None
        else:
            # Part of the next request arrived during this response: it is under the
            # header deadline now, not uvicorn's keep-alive timer.
            self._unset_keepalive_if_required()

    # Deadlines

    def _watch(self, deadline: float) -> None:
        self._deadline = deadline
        if self._watchdog is not None:
            if self._watchdog_at <= deadline:
                return  # it fires first and re-arms for the rest
            self._watchdog.cancel()
        self._watchdog = self.loop.call_at(deadline, self._on_watchdog)
        self._watchdog_at = deadline

    def _on_watchdog(self) -> None:
        self._watchdog = None
        phase = self._phase
        if phase == _IDLE or phase == _DRAIN:
            return
        now = self.loop.time()
        if now < self._deadline:
            self._watch(self._deadline)
        elif phase == _HEAD:
            if self.cycle is not None and not self.cycle.response_complete:
                # A pipelined head waits for the response before it: not the client's
                # doing. Its deadline restarts once that response is written.
                self._watch(now + self.limits.header_timeout)
            elif self._head_bytes == 0:
                self.transport.close()  # opened and never used: nothing to answer or log
            else:
                self._refuse_request(_HEADER_TIMEOUT)
        elif self.flow.read_paused or self.cycle.waiting_for_100_continue:
            # uvicorn stopped reading until the application takes the body it holds, or
            # the client waits for the 100 Continue the application has not asked for:
            # not the client's doing.
            self._body_start = now - self._body_bytes * self.limits.body_seconds_per_byte
            self._watch(now + self.limits.body_timeout)
        else:
            if not self.cycle.response_started:  # else too late for a 408: just close
                self.cycle.disconnected = True  # the application sees http.disconnect
                self.cycle.message_event.set()
            self._refuse_request(_BODY_TIMEOUT)

    # Refusing a request

    def _write(self, refusal: _Refusal) -> None:
        out = [refusal.status_line]
        for name, value in self.server_state.default_headers:
            out += (name, b": ", value, b"\r\n")
        out.append(refusal.rest)
        self.transport.write(b"".join(out))

    def _refuse_request(self, refusal: _Refusal) -> None:
        self._phase = _DRAIN
        LimitedHttpToolsProtocol._idle.pop(self, None)
        self._unset_keepalive_if_required()
        self._count(refusal)
        transport = self.transport
        if self.cycle is not None and not self.cycle.response_complete:
            if not self.cycle.disconnected:  # an answer is due (or begun) on this connection
                transport.close()
                return
        self._write(refusal)
        if not transport.can_write_eof():
            transport.close()
            return
        # Shut our side, and read (and drop) what the client still sends for a moment:
        # closing with unread data resets the connection and can lose the answer.
        transport.write_eof()
        self.flow.resume_reading()
        self._linger = self.loop.call_later(_LINGER_SECONDS, transport.close)


def raise_open_files_limit(max_connections: int) -> None:
    """Let the process hold ``max_connections`` sockets and its own (Redis, Postgres,
    files): raise the soft RLIMIT_NOFILE toward the hard one, and warn if that falls
    short, since past it accept() fails for everyone (health checks included)."""
    wanted = max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "the open files limit (%d) is below HTTP_MAX_CONNECTIONS + 256 (%d): past it "
            "new connections fail before the cap can answer them; raise `ulimit -n`",
            soft,
            wanted,
        )


_SERVICE_UNAVAILABLE = _refusal(
    503,
    "unavailable",
    "Too many open connections (HTTP_MAX_CONNECTIONS); retry shortly.",
    "connections at HTTP_MAX_CONNECTIONS with none idle (503)",
    b"retry-after: 1\r\n",
)
_HEADER_TOO_LARGE = _refusal(
    431,
    "header_too_large",
    "The request line and headers exceed HTTP_MAX_HEADER_BYTES.",
    "heads over HTTP_MAX_HEADER_BYTES (431)",
)
_HEADER_TIMEOUT = _refusal(
    408,
    "header_timeout",
    "The request line and headers did not arrive within HTTP_HEADER_TIMEOUT_SECONDS.",
    "heads past HTTP_HEADER_TIMEOUT_SECONDS (408)",
)
_BODY_TIMEOUT = _refusal(
    408,
    "body_timeout",
    "The request body paused for longer than HTTP_BODY_TIMEOUT_SECONDS, or arrived "
    "slower than HTTP_BODY_MIN_RATE bytes a second.",
    "bodies past HTTP_BODY_TIMEOUT_SECONDS or under HTTP_BODY_MIN_RATE (408)",
)
