"""The Cluster client's failover workarounds (service/adapters/redis.py ``ClusterClient``):
what redis-py 5.3's ``RedisCluster`` raises in a command whose connection another
command's failure closed becomes the ConnectionError it stands for (a 503), and nothing
else is touched; the URL's nodes are asked for the slot map however many redis-py
dropped. No I/O: redis-py's own methods are replaced by stand-ins."""

from __future__ import annotations

from typing import Any, cast

import pytest
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, NodesManager, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError

from service.adapters.redis_cluster import ClusterClient
from service.core.errors import classify

# What the chaos test (tests/integration/test_cluster_chaos.py) met, from redis-py 5.3.1.
CLOSED_UNDER_IT = [
    AttributeError("'NoneType' object has no attribute 'writelines'"),  # writer gone
    AttributeError("'NoneType' object has no attribute 'name'"),  # default node reset
    RuntimeError(
        "unable to perform operation on <TCPTransport closed=True reading=False 0x55e0>; "
        "the handler is closed"
    ),  # uvloop
]


def _client() -> ClusterClient:
    """A client that has not connected (nor will: every call below is a stand-in)."""
    client: ClusterClient = ClusterClient(  # type: ignore[abstract]  # as connect_redis makes it
        startup_nodes=[ClusterNode("127.0.0.1", 7000), ClusterNode("127.0.0.1", 7001)]
    )
    return client


@pytest.mark.parametrize("exc", CLOSED_UNDER_IT, ids=str)
async def test_a_command_whose_connection_was_closed_under_it_raises_connection_error(
    exc: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing(self: RedisCluster, *args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(RedisCluster, "execute_command", failing)
    with pytest.raises(RedisConnectionError) as caught:
        await _client().execute_command("EVALSHA", "sha", 1, "{0}:k")
    assert caught.value.__cause__ is exc
    found = classify(caught.value)
    assert found is not None and found.code == "redis_unavailable"


@pytest.mark.parametrize(
    "exc",
    [AttributeError("'Foo' object has no attribute 'bar'"), RuntimeError("a bug"), KeyError("k")],
    ids=str,
)
async def test_other_errors_pass_unchanged(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(self: RedisCluster, *args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(RedisCluster, "execute_command", failing)
    with pytest.raises(type(exc)) as caught:
        await _client().execute_command("GET", "k")
    assert caught.value is exc


@pytest.mark.parametrize("exc", CLOSED_UNDER_IT, ids=str)
async def test_a_pipeline_raises_or_answers_connection_error_in_place(
    exc: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    exc = type(exc)(*exc.args)  # its own: changed below

    async def failing(self: ClusterPipeline, *args: Any, **kwargs: Any) -> Any:
        raise exc

    monkeypatch.setattr(ClusterPipeline, "execute", failing)
    pipe = _client().pipeline()
    pipe.get("{0}:k")
    with pytest.raises(RedisConnectionError):
        await pipe.execute()
    # As ClusterPipeline raises a command's error (raise_on_error): its words first.
    exc.args = (f"Command # 1 (GET {{0}}:k) of pipeline caused error: {exc.args}",)
    with pytest.raises(RedisConnectionError):
        await pipe.execute()

    bug = KeyError("k")

    async def in_place(self: ClusterPipeline, *args: Any, **kwargs: Any) -> Any:
        return [exc, b"answer", bug]

    monkeypatch.setattr(ClusterPipeline, "execute", in_place)
    first, second, third = await _client().pipeline().execute(raise_on_error=False)
    assert isinstance(first, RedisConnectionError) and first.__cause__ is exc
    assert second == b"answer" and third is bug


def test_the_default_node_stays_known_while_the_slot_map_is_read_again() -> None:
    client = _client()
    node = next(iter(client.nodes_manager.startup_nodes.values()))
    client.nodes_manager.nodes_cache = {node.name: node}
    cast(Any, client.nodes_manager).default_node = None  # as NodesManager.aclose() leaves it
    assert client.get_default_node() is node


async def test_the_urls_nodes_are_asked_again_after_redis_py_dropped_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py drops a startup node at each ConnectionError through it; with all of them
    gone it could never read the slot map again (an API answering 500 for good)."""
    client = _client()
    client.nodes_manager.startup_nodes.clear()
    asked: list[list[str]] = []

    async def read_slot_map(self: NodesManager) -> None:
        asked.append(sorted(self.startup_nodes))
        raise RedisConnectionError("no node answers")

    monkeypatch.setattr(NodesManager, "initialize", read_slot_map)
    with pytest.raises(RedisConnectionError):
        await client.initialize()
    assert asked == [["127.0.0.1:7000", "127.0.0.1:7001"]]
