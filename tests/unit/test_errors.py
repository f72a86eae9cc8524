"""The one classifier of dependency failures (service/core/errors.py)."""

from __future__ import annotations

import asyncpg
import pytest
from redis import exceptions as redis_errors

from service.core.errors import Unavailable, classify, redis_unavailable


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (redis_errors.ConnectionError("Connection refused"), "redis_unavailable"),
        (redis_errors.TimeoutError("Timeout reading from socket"), "redis_unavailable"),
        (ConnectionResetError("reset by peer"), "redis_unavailable"),
        (
            redis_errors.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
            "redis_full",
        ),
        (
            redis_errors.ResponseError(
                "Error running script (call to f_1): @user_script:10: OOM command not allowed"
            ),
            "redis_full",
        ),
        (
            redis_errors.ReadOnlyError("You can't write against a read only replica."),
            "redis_readonly",
        ),
        (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"), "redis_loading"),
        (redis_errors.ResponseError("BUSY Redis is busy running a script."), "redis_busy"),
        (redis_errors.ResponseError("MASTERDOWN Link with MASTER is down"), "redis_unavailable"),
        (
            asyncpg.CannotConnectNowError("the database system is starting up"),
            "postgres_unavailable",
        ),
        (asyncpg.InterfaceError("connection is closed"), "postgres_unavailable"),
    ],
)
def test_dependency_failures_are_classified(exc: Exception, code: str) -> None:
    found = classify(exc)
    assert found is not None
    assert found.code == code
    assert found.retry_after >= 1


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        KeyError("a bug"),
        redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
        redis_errors.DataError("Invalid input of type: 'dict'"),
        asyncpg.DataError("invalid input syntax for type json"),  # poison: dead-lettered
        # Refused by asyncpg before it reached Postgres: bad input, not an outage.
        asyncpg.exceptions._base.DataError("invalid input for query argument $1"),
    ],
)
def test_bugs_and_bad_data_are_not_dependency_failures(exc: Exception) -> None:
    assert classify(exc) is None


def test_an_unavailable_error_classifies_as_itself() -> None:
    exc = Unavailable("postgres", "down", retry_after=3)
    assert classify(exc) is exc


def test_redis_unavailable_looks_through_causes() -> None:
    try:
        try:
            raise redis_errors.ConnectionError("gone")
        except redis_errors.ConnectionError as inner:
            raise RuntimeError("arq's poll loop died") from inner
    except RuntimeError as outer:
        assert redis_unavailable(outer)
    assert not redis_unavailable(RuntimeError("a bug"))


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.ClusterDownError("The cluster is down"),  # type: ignore[no-untyped-call]
        redis_errors.TryAgainError("Multiple keys request during rehashing of slot"),  # type: ignore[no-untyped-call]
        redis_errors.ClusterError("TTL exhausted."),
        redis_errors.MovedError("3999 127.0.0.1:6381"),  # type: ignore[no-untyped-call]
        redis_errors.AskError("3999 127.0.0.1:6381"),  # type: ignore[no-untyped-call]
        redis_errors.SlotNotCoveredError('Slot "3999" is not covered by the cluster.'),
        redis_errors.RedisClusterException("Redis Cluster cannot be connected. Please provide..."),
    ],
)
def test_a_cluster_in_flux_is_a_503(exc: Exception) -> None:
    found = classify(exc)
    assert found is not None and found.dependency == "redis"
    assert found.code == "redis_unavailable"


def test_a_cluster_client_bug_is_not_a_503() -> None:
    blocked = redis_errors.RedisClusterException("Calling pipelined function evalsha is blocked")
    assert classify(blocked) is None


@pytest.mark.parametrize(
    "exc",
    [
        redis_errors.MasterDownError("Link with MASTER is down"),  # type: ignore[no-untyped-call]
        redis_errors.TryAgainError(),  # type: ignore[no-untyped-call]  # its message is empty
        # A primary and all its replicas down: the slot map read leaves slots without a node.
        redis_errors.RedisClusterException("All slots are not covered after query all nodes."),
    ],
)
def test_more_of_a_cluster_in_flux_is_a_503(exc: Exception) -> None:
    found = classify(exc)
    assert found is not None and found.code == "redis_unavailable"
    assert redis_unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        # Our bugs, not the Cluster's state: keys of one script in two slots, a command
        # redis-py cannot route.
        redis_errors.ClusterCrossSlotError("Keys in request don't hash to the same slot"),
        redis_errors.RedisClusterException("No way to dispatch this command to Redis Cluster."),
    ],
)
def test_cluster_errors_that_are_bugs_are_not_dependency_failures(exc: Exception) -> None:
    assert classify(exc) is None


def test_a_task_group_of_dependency_failures_is_one() -> None:
    """The flusher runs its loops in a TaskGroup: Redis gone fails them with an
    ExceptionGroup (seen killing a Cluster primary under a polling worker, which exited)."""
    lost = redis_errors.ConnectionError("Error 111 connecting to 127.0.0.1:7000.")
    group = ExceptionGroup("unhandled errors in a TaskGroup", [lost, TimeoutError("read")])
    found = classify(group)
    assert found is not None and found.code == "redis_unavailable"
    assert redis_unavailable(group)
    nested = ExceptionGroup("outer", [group, redis_errors.ClusterError("TTL exhausted.")])
    assert classify(nested) is not None
    # One bug among them: the group is a bug (raised, not retried).
    assert classify(ExceptionGroup("g", [lost, KeyError("a bug")])) is None
