"""The memcached door: an asyncio server in the API process (same event loop, RecordStore
and shared Redis connection as HTTP), started by the lifespan when MEMCACHED_PORT is set.

A connection's commands run concurrently, so a pipelining client gets the store's
throughput rather than one round trip per command; the replies leave in the order the
commands came. Commands on one key run in order (each waits for the previous command on
that key), so a pipelined ``set k`` then ``get k`` reads its own write; ``flush_all``,
``stats`` and the like wait for everything before them, and everything after waits for
them. A client that sends faster than it reads (or than the store answers) is paused:
reading stops at MAX_IN_FLIGHT commands or while its replies are not being read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import cast

from service.api.http import validate_collection
from service.api.memcached import meta, text
from service.api.memcached.door import Door
from service.api.memcached.errors import error_reply
from service.api.memcached.ops import Items
from service.api.memcached.parser import Parser, Refused, Request, server_error
from service.config import Settings
from service.core.records import RecordStore
from service.core.write_through import WriteThrough

log = logging.getLogger("wbcache.memcached")

MAX_LINE = 64 * 1024
MAX_IN_FLIGHT = 1024
_RESUME_AT = MAX_IN_FLIGHT // 2
# Text commands where a trailing ``noreply`` means: send nothing, not even an error.
_NOREPLY = frozenset(
    (b"set", b"add", b"replace", b"append", b"prepend", b"cas", b"delete", b"incr", b"decr")
    + (b"touch", b"flush_all", b"verbosity")
)
# Commands that wait for all before them, and that all after them wait for.
_BARRIERS = frozenset((b"flush_all", b"stats", b"version", b"verbosity", b"mn"))
_RETRIEVALS = frozenset((b"get", b"gets"))
_GAT = frozenset((b"gat", b"gats"))
_HANDLERS = {**text.COMMANDS, **meta.COMMANDS}
_CLOSE = b""  # a reply after which the connection closes (quit, a line past MAX_LINE)

# Observer of each command: (command, outcome, seconds); outcome ok, error,
# client_error or server_error.
Observer = Callable[[str, str, float], None]


def _outcome(reply: bytes) -> str:
    if reply.startswith(b"SERVER_ERROR"):
        return "server_error"
    if reply.startswith(b"CLIENT_ERROR"):
        return "client_error"
    if reply.startswith(b"ERROR"):
        return "error"
    return "ok"


def _keys(req: Request) -> Iterable[bytes]:
    if req.command in _RETRIEVALS:
        return req.args
    if req.command in _GAT:
        return req.args[1:]
    return req.args[:1]


class _Reply:
    """One command's place in the connection's reply order."""

    __slots__ = ("close", "data", "done", "task")

    def __init__(self) -> None:
        self.data = b""
        self.done = False
        self.close = False
        self.task: asyncio.Task[None] | None = None


class Connection(asyncio.Protocol):
    def __init__(self, server: MemcachedServer) -> None:
        self.server = server
        self.door = server.door
        self.parser = Parser(MAX_LINE, server.max_value)
        self.transport: asyncio.Transport | None = None
        self.replies: deque[_Reply] = deque()
        self.in_flight = 0
        self.last: dict[bytes, asyncio.Task[None]] = {}
        self.barrier: asyncio.Task[None] | None = None
        self.closing = False
        self.read_paused = False
        self.write_paused = False

    # -- transport events -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is not an asyncio.Transport subclass, though it is one.
        self.transport = transport = cast(asyncio.Transport, transport)
        stats = self.door.stats
        if len(self.server.connections) >= self.door.max_connections:
            stats.rejected_connections += 1
            transport.write(server_error("too many open connections"))
            transport.close()
            self.closing = True
            return
        self.server.connections.add(self)
        stats.curr_connections += 1
        stats.total_connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.door.stats.curr_connections -= 1
        # Commands already read run to their end, as memcached's would: a write the client
        # sent is applied (or not) whole; only its reply has nowhere to go.
        self.closing = True
        self.replies.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._maybe_resume()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.parser.feed(data)
        self._take_requests()

    # -- requests ---------------------------------------------------------------------

    def _take_requests(self) -> None:
        while not self.closing and self.in_flight < MAX_IN_FLIGHT and not self.write_paused:
            request = self.parser.next()
            if request is None:
                return
            if isinstance(request, Refused):
                self._refused(request)
            else:
                self._start(request)
        if not self.closing:
            self._pause_reading()

    def _refused(self, refused: Refused) -> None:
        reply = _Reply()
        reply.done = True
        if refused.noreply:
            self.door.stats.noreply_errors += 1
        else:
            reply.data = refused.reply
        reply.close = refused.close
        self.closing = refused.close
        self.replies.append(reply)
        self._observe("invalid", refused.reply, 0.0)
        self._flush()

    def _start(self, req: Request) -> None:
        if req.command == b"quit":
            reply = _Reply()
            reply.done = reply.close = True
            self.closing = True
            self.replies.append(reply)
            self._flush()
            return
        handler = _HANDLERS.get(req.command)
        if handler is None:
            refused = Refused(b"ERROR\r\n")
            self._refused(refused)
            return
        reply = _Reply()
        barrier = req.command in _BARRIERS
        waits: list[asyncio.Task[None]] = []
        if barrier:
            waits = [r.task for r in self.replies if r.task is not None and not r.task.done()]
        elif self.barrier is not None and not self.barrier.done():
            waits.append(self.barrier)
        keys = () if barrier else tuple(_keys(req))
        for key in keys:
            previous = self.last.get(key)
            if previous is not None and not previous.done():
                waits.append(previous)
        task = asyncio.get_running_loop().create_task(self._run(req, handler, reply, waits))
        reply.task = task
        if barrier:
            self.barrier = task
        for key in keys:
            self.last[key] = task
        self.replies.append(reply)
        self.in_flight += 1
        task.add_done_callback(lambda t: self._finished(t, keys, reply))

    async def _run(
        self,
        req: Request,
        handler: Callable[[Door, Request], Awaitable[bytes]],
        reply: _Reply,
        waits: list[asyncio.Task[None]],
    ) -> None:
        if waits:
            await asyncio.wait(waits)
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            data = await handler(self.door, req)
        except Exception as exc:
            data = error_reply(exc)
        self._observe(req.command.decode("ascii", "replace"), data, loop.time() - started)
        if req.command in _NOREPLY and req.noreply:
            if _outcome(data) != "ok":
                self.door.stats.noreply_errors += 1
            data = b""
        reply.data = data

    def _finished(self, task: asyncio.Task[None], keys: tuple[bytes, ...], reply: _Reply) -> None:
        self.in_flight -= 1
        reply.done = True
        for key in keys:
            if self.last.get(key) is task:
                del self.last[key]
        self._flush()
        self._maybe_resume()

    def _observe(self, command: str, data: bytes, seconds: float) -> None:
        if self.server.observer is not None:
            name = command if command in self.server.known else "other"
            self.server.observer(name, _outcome(data), seconds)

    # -- replies ----------------------------------------------------------------------

    def _flush(self) -> None:
        """Send the replies that are ready, in command order."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        out: list[bytes] = []
        while self.replies and self.replies[0].done:
            reply = self.replies.popleft()
            out.append(reply.data)
            if reply.close:
                transport.write(b"".join(out))
                transport.close()
                self.replies.clear()
                return
        if out:
            transport.write(b"".join(out))

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if self.closing or self.write_paused:
            return
        if self.in_flight <= _RESUME_AT:
            self._take_requests()
            if self.read_paused and self.in_flight < MAX_IN_FLIGHT and self.transport:
                self.read_paused = False
                self.transport.resume_reading()


class MemcachedServer:
    def __init__(
        self,
        door: Door,
        host: str,
        port: int,
        max_value: int,
        observer: Observer | None = None,
    ) -> None:
        self.door = door
        self.host = host
        self.port = port
        self.max_value = max_value
        self.observer = observer
        self.known = {c.decode() for c in _HANDLERS} | {"invalid"}
        self.connections: set[Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self),
            self.host,
            self.port,
            reuse_address=True,
            # `wbcache serve --workers N`: each process binds the port, the kernel spreads
            # the connections.
            reuse_port=self.port != 0,
            backlog=1024,
        )
        sockets = self._server.sockets
        if sockets and self.port == 0:
            self.port = sockets[0].getsockname()[1]
        log.info("memcached protocol on %s:%d (no authentication)", self.host, self.port)

    async def aclose(self, grace: float = 5.0) -> None:
        """Stop accepting, let the commands in flight answer (within ``grace``), close."""
        if self._server is None:
            return
        self._server.close()
        tasks = [
            r.task
            for c in self.connections
            for r in c.replies
            if r.task is not None and not r.task.done()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for c in list(self.connections):
            if c.transport is not None:
                c.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), grace)
        self._server = None


async def open_door(
    settings: Settings,
    store: RecordStore,
    write_through: WriteThrough,
    observer: Observer | None = None,
) -> MemcachedServer:
    """The memcached server of MEMCACHED_PORT (0: any free port), started."""
    validate_collection(settings.memcached_collection)  # refuse a bad name at start
    door = Door(
        Items(store, settings, settings.memcached_collection, write_through),
        settings.memcached_allow_flush,
        settings.memcached_max_connections,
    )
    assert settings.memcached_port is not None
    server = MemcachedServer(
        door,
        settings.memcached_bind,
        settings.memcached_port,
        settings.max_document_bytes,
        observer,
    )
    await server.start()
    return server
