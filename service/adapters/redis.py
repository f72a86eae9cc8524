"""redis-py's asyncio pool, as a small subclass of its ``BlockingConnectionPool`` (which
waits for a free connection, up to ``timeout`` seconds, instead of failing), without the
per-command work the hot path does not need.

Measured per EVALSHA with 32 concurrent tasks (``python -m bench.redis_client``,
bench/README.md "Redis client"): the stock pool and connection cost ~150 µs of CPU per
call, this one ~75 µs. Where it goes:

* ``ConnectionPool.ensure_connection`` probes every checked-out connection for unread data
  with ``can_read_destructive()``: a zero timeout around a socket read, i.e. a timer, a
  cancelled future and an extra event-loop turn per command. A pooled connection cannot
  hold unread data here: redis-py disconnects a connection on any error or cancellation
  between sending a command and reading its reply (``read_response`` and
  ``send_packed_command`` both do), so the probe never finds anything.
* ``Connection.send_packed_command`` wraps each write in ``asyncio.wait_for`` when
  ``socket_timeout`` is set: a new task per command. A write to a connected socket only
  waits when the kernel buffer is full, and a Redis that stops answering is still caught
  by the read timeout, which stays.
* redis-py packs commands in a Python loop; hiredis packs them in C (116 -> 76 µs).
* What the probe was for, a pooled connection the server closed (a Redis restart, its idle
  ``timeout``), is read for free at checkout: the event loop has already fed the EOF to
  the connection's reader. Such a connection, and one whose health-check PING fails, is
  replaced before the command is sent, so a restart costs no request a 503.

The stock ``ConnectionPool`` raises "Too many connections" once ``max_connections`` are in
use, a 503 under a burst of more concurrent requests than connections; this pool queues
the caller (redis-py's ``BlockingConnectionPool`` wait, first come first served) for up to
5 s, then raises a ``ConnectionError`` that says so (a 503). While nobody waits and a
connection is free, a checkout skips that wait's lock and timer (12 -> 1.5 µs of CPU per
command, interleaved A/B): the common case costs what it did before the subclass.

A ``redis+sentinel://`` URL (service/adapters/redis_url.py) gets the same pool over redis-py's
``SentinelConnectionPool``: each new connection asks the Sentinels for the primary; a
checkout of a live pooled connection does not.

A ``redis+cluster://`` URL gets redis-py's own ``RedisCluster`` client (``connect_redis``):
it keeps the slot map, sends each command to the primary of its keys' slot, splits a
pipeline by node (one round trip per node, in parallel), and follows ``MOVED`` and ``ASK``
during a resharding and a failover; ``ClusterClient`` (service/adapters/redis_cluster.py)
fixes what that client does wrong under concurrent commands. arq, which has no Cluster
support, then gets its own standalone Redis (``ARQ_REDIS_URL``, ``create_arq_redis``) or
none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import hiredis
from arq.connections import ArqRedis
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.adapters.arq import use_prefix
from service.adapters.identity import client_name
from service.adapters.redis_cluster import ClusterClient
from service.adapters.redis_mux import RedisMux
from service.adapters.redis_url import (
    SentinelUrl,
    is_cluster_url,
    is_sentinel_url,
    parse_cluster_url,
    parse_sentinel_url,
)
from service.config import Settings

# What the service talks to: one Redis (standalone, or the primary the Sentinels name), or
# a Cluster client that routes each command by its keys' slot.
AnyRedis = Redis | RedisCluster


class LeanConnection(Connection):
    """A TCP connection whose writes skip ``asyncio.wait_for`` (reads keep the timeout)
    and whose commands are packed by hiredis (in C) instead of redis-py's Python loop."""

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        # redis-py sends some commands with their subcommand in one argument ("CLIENT
        # SETNAME", "SCRIPT LOAD"); Redis wants them apart.
        if isinstance(first, str | bytes) and (
            " " in first if isinstance(first, str) else b" " in first
        ):
            args = (*first.split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:  # what hiredis does not take (memoryview, bool): redis-py decides
            return super().pack_command(*args)

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        elif check_health:
            await self.check_health()  # type: ignore[no-untyped-call]
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        try:
            assert self._writer is not None
            self._writer.writelines(command)
            # The common case: the kernel took every byte, so there is nothing to drain
            # (a connection lost meanwhile fails the read that follows).
            if self._writer.transport.get_write_buffer_size():
                async with asyncio.timeout(self.socket_timeout or None):
                    await self._writer.drain()
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        except OSError as e:
            await self.disconnect(nowait=True)
            raise RedisConnectionError(f"Error while writing to socket: {e}") from e
        except BaseException:
            # As redis-py does: a half-sent command leaves the connection unusable.
            await self.disconnect(nowait=True)
            raise


def _closed_by_peer(connection: AbstractConnection) -> bool:
    """Has the event loop seen the server close this connection? asyncio's stream protocol
    feeds a FIN to the reader as EOF and a reset as its exception. No I/O: what the loop
    already learnt."""
    reader = connection._reader
    return reader is None or reader.at_eof() or reader.exception() is not None


def _ready_to_send(connection: AbstractConnection) -> bool:
    """Connected, not closed by the server, and no health check due (the common case,
    decided without a coroutine)."""
    if not connection.is_connected or _closed_by_peer(connection):
        return False
    interval = connection.health_check_interval
    return not interval or asyncio.get_running_loop().time() <= connection.next_health_check


class LeanConnectionPool(BlockingConnectionPool):
    """See the module docstring. Unix-socket and TLS URLs keep redis-py's connection
    classes (and its packing); the checkout is lean for them too."""

    def __init__(self, timeout: float = 5.0, **kwargs: Any) -> None:
        if kwargs.get("connection_class", Connection) is Connection:
            kwargs["connection_class"] = LeanConnection
        super().__init__(timeout=timeout, **kwargs)  # type: ignore[arg-type]
        self._waiting = 0

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        if self._waiting or not self.can_get_connection():
            return await self._wait_for_connection()
        # Nobody waits and a connection is free: take it without the Condition and the
        # timer redis-py sets up per checkout (~12 µs of CPU per command, measured).
        connection: AbstractConnection = self.get_available_connection()  # type: ignore[no-untyped-call]
        if _ready_to_send(connection):
            return connection
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def _wait_for_connection(self) -> AbstractConnection:
        self._waiting += 1
        try:
            connection: AbstractConnection = await super().get_connection()
        except RedisConnectionError as exc:
            if isinstance(exc.__cause__, TimeoutError):  # the wait, not a connect
                raise RedisConnectionError(
                    f"all {self.max_connections} Redis connections stayed busy for {self.timeout} s"
                ) from None
            raise
        finally:
            self._waiting -= 1
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if self._waiting:
            await super().release(connection)  # and wake a waiter
        else:
            # Nobody to wake: a later waiter checks for a free connection before it sleeps.
            await ConnectionPool.release(self, connection)

    async def ensure_connection(self, connection: AbstractConnection) -> None:
        """Make a checked-out connection ready to send, without redis-py's unread-data
        probe. A connection the server closed while it sat in the pool (a Redis restart,
        its idle ``timeout``) is replaced before anything is sent on it, and so is one
        whose health-check PING fails: in both cases the command was provably not sent,
        so a fresh connection takes it instead of the request failing once per pooled
        connection. A command that was sent is never retried here (a write script may
        have run)."""
        if connection.is_connected and _closed_by_peer(connection):
            await connection.disconnect(nowait=True)
        if not connection.is_connected:
            await connection.connect()  # type: ignore[no-untyped-call]
            return
        if (
            connection.health_check_interval
            and asyncio.get_running_loop().time() > connection.next_health_check
        ):
            try:
                await connection.check_health()  # type: ignore[no-untyped-call]
            except (RedisConnectionError, RedisTimeoutError):
                await connection.disconnect(nowait=True)
                await connection.connect()  # type: ignore[no-untyped-call]


class LeanSentinelConnection(SentinelManagedConnection, LeanConnection):
    """A connection to whichever node the Sentinels name as the primary (asked at each
    connect), with the lean writes and hiredis packing of ``LeanConnection``. redis-py's
    ``SentinelManagedConnection`` turns a READONLY reply (a primary demoted under us) into
    a ``ConnectionError`` and disconnects, so the next connect asks the Sentinels again."""


class LeanSentinelPool(SentinelConnectionPool, LeanConnectionPool):
    """``LeanConnectionPool``'s checkout over redis-py's ``SentinelConnectionPool``: new
    connections go to the primary the Sentinels name (``MasterNotFoundError``, a
    ``ConnectionError``, while they name none: a 503), and idle connections to a former
    primary are dropped once a connect learns the new address. A checkout of a live pooled
    connection costs what it costs in standalone mode (no Sentinel round trip)."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        kwargs.setdefault("connection_class", LeanSentinelConnection)
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:
            # Closing the client (``aclose``), not a change of primary (which disconnects
            # only idle connections): close the connections to the Sentinels too.
            manager: Sentinel = self.sentinel_manager
            for sentinel in manager.sentinels:
                await sentinel.aclose()


def _sentinel_pool(url: SentinelUrl, options: dict[str, Any]) -> LeanSentinelPool:
    # The Sentinels answer at once or not at all: a short read timeout moves on to the
    # next one quickly.
    sentinel_options = {
        "socket_connect_timeout": options.get("socket_connect_timeout", 2.0),
        "socket_timeout": 2.0,
    }
    manager = Sentinel(list(url.sentinels), sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    return LeanSentinelPool(
        url.master,
        manager,
        db=url.db,
        username=url.username,
        password=url.password,
        **options,
    )


def _options(process: str, settings: Settings, kwargs: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "client_name": client_name(process),
        "max_connections": settings.redis_max_connections,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "health_check_interval": 15,
    }
    options.update(kwargs)
    return options


def _standalone(url: str, settings: Settings, options: dict[str, Any]) -> ArqRedis:
    pool: LeanConnectionPool
    if is_sentinel_url(url):
        pool = _sentinel_pool(parse_sentinel_url(url), options)
    else:
        pool = LeanConnectionPool.from_url(url, **options)
    return ArqRedis(pool, default_queue_name=f"{settings.redis_prefix}arq:queue")


def create_redis(process: str, settings: Settings, **kwargs: Any) -> ArqRedis:
    """A Redis client that can also enqueue arq jobs (the flush wake-ups): to the Redis of a
    ``redis://`` / ``rediss://`` / ``unix://`` URL, or to the primary the Sentinels of a
    ``redis+sentinel://`` URL name (following failovers). Not for a Cluster: see
    ``connect_redis``."""
    if is_cluster_url(settings.redis_url):
        raise ValueError("REDIS_URL names a Redis Cluster: use connect_redis")
    use_prefix(settings.redis_prefix)
    return _standalone(settings.redis_url, settings, _options(process, settings, kwargs))


def connect_redis(process: str, settings: Settings, **kwargs: Any) -> AnyRedis:
    """The service's Redis client for any ``REDIS_URL``: ``create_redis``'s, or a
    ``RedisCluster`` for ``redis+cluster://``. ``max_connections`` is per Cluster node."""
    if not is_cluster_url(settings.redis_url):
        return create_redis(process, settings, **kwargs)
    use_prefix(settings.redis_prefix)
    url = parse_cluster_url(settings.redis_url)
    options = _options(process, settings, kwargs)
    options.pop("timeout", None)  # the blocking pool's wait: not a RedisCluster option
    # (mypy: a Cluster client has no connection_pool, which the type hints call abstract)
    cluster: RedisCluster = ClusterClient(  # type: ignore[abstract]
        startup_nodes=[ClusterNode(host, port) for host, port in url.nodes],
        username=url.username,
        password=url.password,
        # A failover or a slot move is retried by redis-py (re-reading the slot map) this
        # many times before the error reaches the caller as a 503.
        cluster_error_retry_attempts=3,
        # On MOVED, patch the one slot's owner instead of rebuilding the client every 5th
        # time (the default): a rebuild replaces every node object and disconnects
        # connections other tasks are using, which under concurrent load leaks connections
        # and fails unrelated commands (seen in tests/integration/test_cluster_topology.py).
        reinitialize_steps=0,
        **options,
    )
    return cluster


async def close_redis(client: AnyRedis) -> None:
    """Close a client from ``connect_redis`` (or ``create_redis``) with its connections."""
    if isinstance(client, Redis):
        await client.aclose(close_connection_pool=True)
    else:
        await client.aclose()


def create_arq_redis(process: str, settings: Settings) -> ArqRedis | None:
    """With a Cluster, a client of ARQ_REDIS_URL, where flush wake-up jobs are enqueued, or
    None without it (workers then poll). Otherwise None: REDIS_URL's own client, an
    ``ArqRedis``, enqueues them."""
    if not is_cluster_url(settings.redis_url):
        return None
    if not settings.arq_redis_url:
        return None
    use_prefix(settings.redis_prefix)
    return _standalone(settings.arq_redis_url, settings, _options(process, settings, {}))


def create_mux(client: AnyRedis, settings: Settings) -> RedisMux | None:
    """The records hot path's shared connection (service/adapters/redis_mux.py), of
    ``client``'s kind: for a standalone or Sentinel client with REDIS_MULTIPLEX on, else
    None. (A Cluster client keeps redis-py's per-node pools.)"""
    if not settings.redis_multiplex or not isinstance(client, Redis):
        return None
    return RedisMux(client.connection_pool, timeout=_options("api", settings, {})["socket_timeout"])
