"""One Redis connection shared by every concurrent request of a process, its commands
written together (auto-pipelining): the records hot path (a write script, a cache read).

With a pool, each concurrent request checks out its own connection and pays, per
command, the checkout, a socket write, a read wake-up and redis-py's reply handling; Redis
pays a read and a write system call per command. Here the commands issued in one turn of
the event loop leave in one write, and one read task takes the replies off the socket in
order and hands each to its caller (hiredis parses them). Measured with 32 concurrent
tasks (``python -m bench.redis_client``, bench/README.md): ~68 µs of client CPU per
EVALSHA through the pool, ~9 µs here; ~66 and ~4 µs per HMGET.

The connection itself is redis-py's (``pool.make_connection()``): the URL's address,
TLS, unix socket, AUTH, SELECT and client name, and, for Sentinel, the primary the
Sentinels name, asked at each connect. A connection that fails (closed, reset, silent for
``timeout`` seconds while commands wait, or READONLY: a demoted primary) fails the
commands sent on it with a ``ConnectionError`` (their fate unknown: a 503) and is
replaced at the next command; commands not yet sent go out on the next connection.

Not for commands that block a connection (``WAIT``, blocking pops): they would hold up
everyone's replies. ``REDIS_MIN_REPLICAS`` writes keep their pool (service/core/records.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("wbcache.redis")

_READ_BYTES = 65536


def _run_id(info: Any) -> str:
    """The run_id line of an INFO server reply."""
    text = info.decode() if isinstance(info, bytes) else str(info)
    for line in text.splitlines():
        if line.startswith("run_id:"):
            return line[len("run_id:") :].strip()
    return ""


class _Link:
    """One connection and the commands sent on it that wait for their replies."""

    def __init__(self, connection: AbstractConnection, run_id: str) -> None:
        self.connection = connection
        self.run_id = run_id
        self.sent: deque[asyncio.Future[Any]] = deque()
        # Error replies as redis-py's exceptions, nested ones too (an error inside a
        # script's array reply), as redis-py's own hiredis parser makes them.
        self.parser = hiredis.Reader(replyError=BaseParser.parse_error)
        # When a reply last came, or the first of the waiting commands left: the watchdog
        # measures silence from it.
        self.since = asyncio.get_running_loop().time()
        self.failed = False
        self.reading: asyncio.Task[None] | None = None

    def write(self, packed: list[bytes]) -> None:
        writer = self.connection._writer  # redis-py's StreamWriter, connected
        assert writer is not None
        writer.writelines(packed)


class RedisMux:
    """Commands of many tasks over one connection of ``pool``'s kind (see module)."""

    def __init__(self, pool: ConnectionPool, timeout: float = 5.0) -> None:
        self._pool = pool
        self._timeout = timeout
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._unsent: list[Sequence[Any] | Callable[[str], Sequence[Any]]] = []
        self._unsent_futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        # Connections being closed: kept referenced until they are.
        self._closing: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """``args``' reply, as redis-py's ``execute_command`` with no response callback
        gives it (bytes, ints, lists; error replies raised as redis-py's exceptions)."""
        return await self._queue(args)

    async def execute_bound(self, command: Callable[[str], Sequence[Any]]) -> Any:
        """``execute`` of the command ``command(run_id)`` builds, given the ``run_id`` of
        the very server the command is written to (INFO server, asked at connect), so
        that a script can tell whether the data it finds is from that server's lifetime
        (service/core/key_filter.py): a reconnect to another server (a failover, a
        restart) between building and sending cannot slip by."""
        return await self._queue(command)

    async def _queue(self, command: Sequence[Any] | Callable[[str], Sequence[Any]]) -> Any:
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._unsent.append(command)
        self._unsent_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    # -- sending ------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._unsent:
            return
        link = self._link
        if link is None or link.failed:
            self._ensure_connecting()
            return  # sent once connected (_connected)
        commands, futures = self._unsent, self._unsent_futures
        self._unsent, self._unsent_futures = [], []
        packed = [
            hiredis.pack_command(tuple(c(link.run_id) if callable(c) else c)) for c in commands
        ]
        if not link.sent:
            link.since = asyncio.get_running_loop().time()
        link.sent.extend(futures)
        try:
            link.write(packed)
        except Exception as exc:
            self._fail(link, exc)
            return
        self._arm_watchdog()

    def _ensure_connecting(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.create_task(self._connect())
            self._connecting.add_done_callback(self._connected)

    async def _connect(self) -> _Link:
        connection: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()  # type: ignore[no-untyped-call]
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        try:
            await connection.send_command("INFO", "server")
            info = await connection.read_response()
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        link = _Link(connection, _run_id(info))
        link.reading = asyncio.create_task(self._read(link))
        return link

    def _connected(self, task: asyncio.Task[_Link]) -> None:
        if task.cancelled():
            exc: BaseException | None = RedisConnectionError("connecting to Redis was cancelled")
        else:
            exc = task.exception()
        if exc is not None:
            # Nothing was sent: the waiting commands fail as a refused connect would.
            futures, self._unsent, self._unsent_futures = self._unsent_futures, [], []
            error = exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc))
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        link = task.result()
        if self._closed:
            self._fail(link, RedisConnectionError("the Redis client is closed"))
            return
        self._link = link
        self._flush()

    # -- receiving ----------------------------------------------------------------------

    async def _read(self, link: _Link) -> None:
        reader = link.connection._reader
        assert reader is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await reader.read(_READ_BYTES)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                link.since = loop.time()
                link.parser.feed(data)
                while (reply := link.parser.gets()) is not False:
                    self._answer(link, reply)
                    if link.failed:
                        return
        except asyncio.CancelledError:
            self._fail(link, RedisConnectionError("the Redis connection was closed"))
            raise
        except Exception as exc:
            self._fail(link, exc)

    def _answer(self, link: _Link, reply: Any) -> None:
        future = link.sent.popleft()
        if isinstance(reply, ResponseError):
            if isinstance(reply, ReadOnlyError):
                # A demoted primary: the next connect asks again (Sentinel) for the new one.
                self._fail(link, RedisConnectionError(f"Redis answered READONLY: {reply}"))
            if not future.done():
                future.set_exception(reply)
        elif not future.done():
            future.set_result(reply)

    # -- failures -----------------------------------------------------------------------

    def _fail(self, link: _Link, exc: BaseException) -> None:
        if link.failed:
            return
        link.failed = True
        if self._link is link:
            self._link = None
        error = exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc))
        if not isinstance(error, (RedisConnectionError, RedisTimeoutError)):
            error = RedisConnectionError(str(error))
        while link.sent:
            future = link.sent.popleft()
            if not future.done():
                future.set_exception(error)
        closing = asyncio.get_running_loop().create_task(self._close_link(link))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)
        if self._unsent and not self._closed:
            self._ensure_connecting()

    async def _close_link(self, link: _Link) -> None:
        link.failed = True
        task = link.reading
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])  # its end, without its CancelledError
        with contextlib.suppress(Exception):
            await link.connection.disconnect(nowait=True)

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(
                self._timeout / 2, self._check_silence
            )

    def _check_silence(self) -> None:
        """Commands waiting with nothing read for ``timeout`` seconds: the connection is
        dead or Redis is stuck (redis-py's socket_timeout, for the whole connection)."""
        self._watchdog = None
        link = self._link
        if link is None or not link.sent:
            return
        if asyncio.get_running_loop().time() - link.since > self._timeout:
            log.warning("Redis sent nothing for %.1f s while commands waited", self._timeout)
            self._fail(link, RedisTimeoutError(f"no reply from Redis within {self._timeout} s"))
            return
        self._arm_watchdog()

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
        link = self._link
        self._link = None
        if link is not None:
            self._fail(link, RedisConnectionError("the Redis client is closed"))
        await asyncio.gather(*self._closing, return_exceptions=True)
