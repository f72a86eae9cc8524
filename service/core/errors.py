"""Failures of the dependencies, as the API and the CLI report them."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


class Unavailable(Exception):
    """A dependency cannot serve the request now; the client should retry later."""

    def __init__(self, dependency: str, detail: str) -> None:
        super().__init__(f"{dependency} is unavailable: {detail}")
        self.dependency = dependency
        self.detail = detail


REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError)

# SQLSTATE classes that will not heal by retrying: bad data (22), constraints (23).
POISON_CLASSES = ("22", "23")


def sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_poison(exc: BaseException) -> bool:
    state = sqlstate(exc)
    return state is not None and state[:2] in POISON_CLASSES


def is_postgres_down(exc: BaseException) -> bool:
    """Errors that say Postgres cannot answer now (as opposed to a bug or bad data)."""
    if isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg.PostgresError):
        state = sqlstate(exc) or ""
        return state[:2] in ("08", "53", "57", "40", "58") or state == "42P01"
    return False
