"""redis-py's asyncio ``RedisCluster``, as the service uses it for a ``redis+cluster://``
URL, with three of its behaviours under concurrent load fixed in a subclass:

* its failover handling closes every connection, those concurrent commands are using
  included: what they then raise (AttributeError, RuntimeError) becomes the
  ``ConnectionError`` it stands for, a 503 rather than a 500 (``_closed_under_it``);
* its per-node pools raise instead of waiting for a free connection: commands queue for
  one of ``max_connections`` slots, as the standalone pool queues (``command_slot``);
* on ``ASK`` it sends ``ASKING`` as a command of its own, whose connection goes back to
  the end of the node's free list, so the redirected command usually leaves on another
  connection, without the ``ASKING`` flag, and bounces (``_AskingNode``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError


def _closed_under_it(exc: BaseException) -> bool:
    """Is ``exc`` what a Cluster command meets when another command's failure made
    redis-py (5.3) close every connection of the client while this one was using one?

    On a ConnectionError or CLUSTERDOWN (a failover; MOVED no longer, with
    ``reinitialize_steps=0``), redis-py's ``RedisCluster`` re-reads the slot map after
    ``NodesManager.aclose``, which disconnects every connection of every node, those in
    use by concurrent commands included, and sets the default node to None; building the
    new map closes the old nodes' connections again. A command caught in the middle fails
    on the closed connection's missing writer or reader, on uvloop's closed transport, or
    on the missing default node (in ``ClusterPipeline._execute``, after its commands
    ran): redis-py issues #3835 and PR #3458, open. Its command may or may not have run,
    exactly as when a connection drops: a ``ConnectionError`` says so (a 503)."""
    # Anywhere in the message: a pipeline raising a command's error puts its own words first.
    text = str(exc)
    if isinstance(exc, AttributeError):
        return "'NoneType' object has no attribute" in text
    return isinstance(exc, RuntimeError) and "closed" in text


def _connection_lost(exc: BaseException) -> RedisConnectionError:
    lost = RedisConnectionError(
        "the Redis Cluster client closed this command's connection while re-reading the "
        f"slot map after a failover or a slot move ({type(exc).__name__}: {exc})"
    )
    lost.__cause__ = exc
    return lost


# Set while a task runs a command through ClusterClient, so the commands redis-py runs
# inside it do not wait for a second slot (which could deadlock the pool).
_IN_COMMAND: ContextVar[bool] = ContextVar("wbcache_cluster_command", default=False)
# How long a command waits for a free connection, as the standalone pool waits.
POOL_WAIT_SECONDS = 5.0


class ClusterClient(RedisCluster):
    """redis-py's ``RedisCluster``, with what its failover handling does to concurrent
    commands (``_closed_under_it``) raised as the ``ConnectionError`` it stands for, a
    default node while the slot map is being re-read, and the URL's nodes always among
    those it asks for the slot map."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._seeds = [(n.host, n.port) for n in self.nodes_manager.startup_nodes.values()]
        # redis-py's per-node pool raises MaxConnectionsError (a 503) past max_connections
        # instead of waiting, as the standalone pool does: a burst of more concurrent
        # commands than connections (a batch of 1,000 uncached keys) failed in part. A
        # command holds at most one connection per node, so at most max_connections
        # commands at once never exceed any node's pool; the others wait, up to
        # POOL_WAIT_SECONDS, first come first served.
        self._commands = asyncio.Semaphore(kwargs.get("max_connections") or 2**31)

    async def initialize(self) -> RedisCluster:
        """Re-read the slot map (when due), asking the URL's nodes too. redis-py drops a
        node from the nodes it asks at each ConnectionError through it, the healthy nodes
        whose connections it closed itself under concurrent commands included, and only a
        successful read fills them again: once every one is gone, the client can never
        connect again ("Redis Cluster cannot be connected. Please provide at least one
        reachable node: None"), seen as an API answering 500 to every request for good
        after a primary's SIGKILL."""
        if self._initialize:
            known = self.nodes_manager.startup_nodes
            for host, port in self._seeds:
                if f"{host}:{port}" not in known:
                    node = ClusterNode(host, port, **self.connection_kwargs)
                    known[node.name] = node
        return await super().initialize()

    def get_node(
        self, host: str | None = None, port: int | None = None, node_name: str | None = None
    ) -> ClusterNode | None:
        """redis-py looks the node an ``ASK`` names up here before it sends ``ASKING``:
        the node becomes an ``_AskingNode`` (same state, one method changed), so that the
        redirected command leaves on the connection that carried ``ASKING``. redis-py
        builds its nodes itself (``NodesManager``), with no hook for the class."""
        node = super().get_node(host, port, node_name)
        if node is not None and type(node) is ClusterNode:
            node.__class__ = _AskingNode
        return node

    def get_default_node(self) -> ClusterNode:
        node = super().get_default_node()
        if node is None:  # reset by another command's failure until initialize() runs
            node = next(iter(self.nodes_manager.nodes_cache.values()), None)
        return node

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.command_slot():
            try:
                return await super().execute_command(*args, **kwargs)
            except (AttributeError, RuntimeError) as exc:
                if _closed_under_it(exc):
                    raise _connection_lost(exc) from exc
                raise

    @contextlib.asynccontextmanager
    async def command_slot(self) -> AsyncIterator[None]:
        """One of the max_connections commands that may run at once; a command (or a
        pipeline) that runs others inside it (redis-py's retries of redirected commands)
        holds one slot for all of them."""
        if _IN_COMMAND.get():
            yield
            return
        try:
            if self._commands.locked():
                async with asyncio.timeout(POOL_WAIT_SECONDS):
                    await self._commands.acquire()
            else:
                await self._commands.acquire()  # free: returns without waiting
        except TimeoutError:
            raise RedisConnectionError(
                f"no free Redis connection within {POOL_WAIT_SECONDS} s "
                "(REDIS_MAX_CONNECTIONS per Cluster node)"
            ) from None
        token = _IN_COMMAND.set(True)
        try:
            yield
        finally:
            _IN_COMMAND.reset(token)
            self._commands.release()

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        super().pipeline(transaction, shard_hint)  # its refusals (transactions, hints)
        return _ClusterPipeline(self)  # type: ignore[abstract]  # (the same)


class _AskingNode(ClusterNode):
    """A Cluster node whose ``ASKING`` connection is the next one taken.

    ``ASKING`` lets only the next command on its own connection reach a slot being
    imported. redis-py sends it with ``execute_command`` and then the redirected command
    with another: the first returns its connection to the end of the node's free list, the
    second takes the first free one, so with more than one free connection the command
    goes without the flag, the node answers ``MOVED`` back to the slot's old owner, which
    answers ``ASK`` again, until the 16 redirections redis-py allows run out ("TTL
    exhausted", a 503 during a resharding; seen in CI under four concurrent writers)."""

    __slots__ = ()  # ClusterNode's layout, so that a node can become one (get_node)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            if args == ("ASKING",) and self._free:
                # No await since super() put the connection back last: it is still last.
                self._free.rotate(1)


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        client = self._client
        assert isinstance(client, ClusterClient)
        try:
            async with client.command_slot():
                results: list[Any] = await super().execute(raise_on_error, allow_redirections)
        except (AttributeError, RuntimeError) as exc:
            if _closed_under_it(exc):
                raise _connection_lost(exc) from exc
            raise
        # Errors in place (raise_on_error=False): one per command its node's round trip
        # failed for.
        return [_connection_lost(r) if _closed_under_it(r) else r for r in results]
