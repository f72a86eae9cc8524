"""Postgres connections: URL forms for asyncpg and SQLAlchemy, and a pool that outlives
outages. The process name goes into ``application_name`` (``pg_stat_activity``)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from service.adapters.identity import client_name
from service.config import Settings


def asyncpg_dsn(url: str) -> str:
    """asyncpg wants ``postgresql://``; accept SQLAlchemy-style ``postgresql+asyncpg://``."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit((scheme, parts.netloc, parts.path, parts.query, parts.fragment))


def sqlalchemy_url(url: str) -> str:
    """The same database for SQLAlchemy (Alembic) through asyncpg, not psycopg2.

    asyncpg takes TLS as ``ssl=<mode>`` where libpq URLs say ``sslmode=<mode>``.
    """
    parts = urlsplit(asyncpg_dsn(url))
    query = [("ssl" if k == "sslmode" else k, v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(
        ("postgresql+asyncpg", parts.netloc, parts.path, urlencode(query), parts.fragment)
    )


async def _no_reset(conn: asyncpg.Connection) -> None:
    return None


class PgPool:
    """An asyncpg pool opened lazily and reopened after failures, so that processes start
    and keep running while Postgres is down (writes are still accepted)."""

    def __init__(self, process: str, settings: Settings) -> None:
        self._process = process
        self._settings = settings
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._closed = False

    async def get(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._closed:
                # A task still running at shutdown (a flush job, a probe) would otherwise
                # open a new pool that nobody closes. An InterfaceError: Postgres
                # unavailable to this process (503, or a flush retried elsewhere).
                raise asyncpg.InterfaceError("the Postgres pool is closed (shutting down)")
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    asyncpg_dsn(self._settings.database_url),
                    min_size=0,
                    max_size=self._settings.pg_pool_max,
                    timeout=self._settings.pg_timeout_seconds,
                    command_timeout=max(30.0, self._settings.pg_timeout_seconds),
                    server_settings={"application_name": client_name(self._process)},
                    # We never change session state, so skip asyncpg's RESET ALL /
                    # UNLISTEN round trip on every release.
                    reset=_no_reset,
                    statement_cache_size=self._settings.pg_statement_cache_size,
                )
            return self._pool

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()
