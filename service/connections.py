"""Connection factories. The process name goes into the client name, so API and worker
connections can be told apart in Redis ``CLIENT LIST`` and ``pg_stat_activity``."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from arq.connections import ArqRedis

from service.arq_keys import use_prefix
from service.config import Settings
from service.redis_pool import LeanConnectionPool


def client_name(process: str) -> str:
    return f"wbcache-{process}-{socket.gethostname()}-{os.getpid()}"


def create_redis(process: str, settings: Settings, **kwargs: Any) -> ArqRedis:
    """A Redis client that can also enqueue arq jobs (the flush wake-ups)."""
    use_prefix(settings.redis_prefix)
    options: dict[str, Any] = {
        "client_name": client_name(process),
        "max_connections": settings.redis_max_connections,
        "socket_connect_timeout": 2.0,
        "socket_timeout": 5.0,
        "health_check_interval": 15,
    }
    options.update(kwargs)
    pool = LeanConnectionPool.from_url(settings.redis_url, **options)
    return ArqRedis(pool, default_queue_name=f"{settings.redis_prefix}arq:queue")


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

    async def get(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
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
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), timeout=5)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                pool.terminate()
