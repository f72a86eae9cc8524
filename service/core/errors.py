"""Failures of the dependencies, classified once: the HTTP edge, the batch path, the worker
and the CLI all ask ``classify`` whether an exception means "a dependency cannot serve
this now" (answer 503 + Retry-After, or retry later) rather than a bug or bad input."""

from __future__ import annotations

import asyncio

import asyncpg
from redis import exceptions as redis_errors


class Unavailable(Exception):
    """A dependency cannot serve the request now; the client should retry later.

    ``code`` is the error code clients see (``redis_unavailable``, ``redis_full``, ...)."""

    def __init__(
        self, dependency: str, detail: str, code: str | None = None, retry_after: int = 1
    ) -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency
        self.detail = detail
        self.code = code or f"{dependency}_unavailable"
        self.retry_after = retry_after


class ReplicasUnconfirmed(Unavailable):
    """A write the Redis primary applied, at ``version``, that fewer than REDIS_MIN_REPLICAS
    replicas confirmed within REDIS_REPLICA_TIMEOUT_MS. Not a failure: it may or may not
    survive a failover, so the answer says "unknown", names the version, and ``detail`` is
    the whole message clients read."""

    def __init__(self, version: int, confirmed: int, wanted: int, timeout_ms: int) -> None:
        super().__init__(
            "redis",
            f'The write was accepted by the Redis primary (version {version}, ETag "{version}") '
            f"and queued for Postgres, but only {confirmed} of {wanted} required replicas "
            f"confirmed it within {timeout_ms} ms: it may or may not survive a Redis failover. "
            "Retrying it with the same If-Match is safe (a 412 naming this ETag means the "
            "write is in place).",
            "replicas_unconfirmed",
        )
        self.version = version
        self.confirmed = confirmed
        self.wanted = wanted


REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError, ConnectionError)

# A Redis Cluster between two states (a failover, a slot moving), once redis-py's own
# retries (re-reading the slot map, following MOVED/ASK, waiting out TRYAGAIN) ran out:
# CLUSTERDOWN, TRYAGAIN, its "TTL exhausted", a redirection loop, a slot no node serves.
_CLUSTER_IN_FLUX = (
    redis_errors.ClusterError,
    redis_errors.TryAgainError,
    redis_errors.AskError,
    redis_errors.SlotNotCoveredError,
)


def _cluster_unreachable(exc: BaseException) -> bool:
    """redis-py's Cluster client (a RedisClusterException, not a RedisError) when it
    re-reads the slot map and no node it knows answers ("cannot be connected"), or the
    answers leave slots without a node ("All slots are not covered": a primary and its
    replicas all down)."""
    return isinstance(exc, redis_errors.RedisClusterException) and (
        "cannot be connected" in str(exc) or str(exc).startswith("All slots are not covered")
    )


# SQLSTATE classes that will not heal by retrying: bad data (22), constraints (23).
POISON_CLASSES = ("22", "23")

# Redis error replies that say "not now" rather than "wrong command": the prefix of the
# reply, the code clients see, and what to tell them.
_REDIS_NOT_NOW = {
    "OOM": ("redis_full", "Redis is at maxmemory: writes wait for the queue to drain"),
    "READONLY": ("redis_readonly", "Redis is a read-only replica (a failover in progress?)"),
    "LOADING": ("redis_loading", "Redis is loading its data set"),
    "BUSY": ("redis_busy", "Redis is busy running a script"),
    "MASTERDOWN": ("redis_unavailable", "the Redis replica lost its primary"),
    "NOREPLICAS": ("redis_unavailable", "not enough Redis replicas"),
    "TRYAGAIN": ("redis_unavailable", "Redis asks to try again"),
    "CLUSTERDOWN": ("redis_unavailable", "the Redis cluster is down"),
}


def sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_poison(exc: BaseException) -> bool:
    state = sqlstate(exc)
    return state is not None and state[:2] in POISON_CLASSES


def is_postgres_down(exc: BaseException) -> bool:
    """Errors that say Postgres cannot answer now (as opposed to a bug or bad data)."""
    if isinstance(exc, ValueError):
        return False  # asyncpg's client-side DataError (an InterfaceError): bad input
    if isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate(exc) or ""
        return state[:2] in ("08", "53", "57", "40", "58") or state == "42P01"
    return False


def _redis_reply(exc: redis_errors.RedisError) -> Unavailable | None:
    # redis-py strips the error prefix for the replies it maps to a class (OOM, READONLY,
    # LOADING); the others keep it in the message.
    if isinstance(exc, redis_errors.OutOfMemoryError):
        prefix = "OOM"
    elif isinstance(exc, redis_errors.ReadOnlyError):
        prefix = "READONLY"
    elif isinstance(exc, redis_errors.BusyLoadingError):
        prefix = "LOADING"
    else:
        text = str(exc)
        # A script's error reply names the failing command first ("Error running script
        # ...: OOM ..."), so look for the prefix as a word anywhere.
        prefix = next((p for p in _REDIS_NOT_NOW if text.startswith(p + " ")), "")
        if not prefix:
            prefix = next((p for p in _REDIS_NOT_NOW if f" {p} " in f" {text} "), "")
    if not prefix:
        return None
    code, what = _REDIS_NOT_NOW[prefix]
    return Unavailable("redis", f"{what} ({exc})", code)


def classify(exc: BaseException, talking_to: str = "redis") -> Unavailable | None:
    """The dependency failure ``exc`` stands for, or None for anything else (a bug, or an
    error the caller answers itself). A bare socket error (OSError, TimeoutError) is
    charged to ``talking_to``: asyncpg raises them unwrapped, redis-py wraps its own."""
    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        # A TaskGroup's (the flusher's concurrent loops): a dependency failure when every
        # member is one, e.g. each loop lost its Redis connection; a bug if any member is.
        found = [classify(member, talking_to) for member in exc.exceptions]
        return found[0] if all(found) else None
    if isinstance(exc, _CLUSTER_IN_FLUX) or _cluster_unreachable(exc):
        return Unavailable("redis", f"the Redis Cluster is changing or down ({exc})")
    if isinstance(exc, redis_errors.RedisError):
        reply = _redis_reply(exc)
        if reply is not None:
            return reply
        if isinstance(exc, REDIS_DOWN):
            return Unavailable("redis", str(exc) or type(exc).__name__)
        return None
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        if isinstance(exc, ValueError):  # asyncpg refused our input before sending it
            return None
        if is_postgres_down(exc) or not is_poison(exc):
            return Unavailable("postgres", f"{type(exc).__name__}: {exc}")
        return None
    if isinstance(exc, OSError | TimeoutError):
        return Unavailable(talking_to, f"{type(exc).__name__}: {exc}")
    return None


def redis_unavailable(exc: BaseException) -> bool:
    """Does ``exc`` (or what caused it) say Redis cannot serve now? (the worker's restart
    loop and the CLI: arq wraps the errors it meets)."""
    seen: BaseException | None = exc
    while seen is not None:
        found = classify(seen)
        if found is not None and found.dependency == "redis":
            return True
        if isinstance(seen, OSError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
