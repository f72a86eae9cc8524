"""The Redis and Postgres the tests use: the test URLs when they answer, else throwaway
servers started here. Never the URLs a user runs with (REDIS_URL / DATABASE_URL)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis

from service.dev.cluster import ClusterTopology
from service.dev.embedded import PostgresServer, RedisServer
from service.dev.sentinel import SentinelTopology

DEFAULT_TEST_REDIS_URL = "redis://127.0.0.1:6379/15"
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/wbcache_test"


@dataclass
class TestServers:
    redis_url: str
    database_url: str
    owned: list[RedisServer | PostgresServer | SentinelTopology | ClusterTopology]
    # With a Cluster: the standalone Redis for arq's wake-ups (ARQ_REDIS_URL).
    arq_redis_url: str | None = None
    shards: int | None = None  # REDIS_SHARDS of the services under test (None: default)

    def close(self) -> None:
        for server in self.owned:
            server.stop()


@contextlib.contextmanager
def data_dir(prefix: str) -> Iterator[Path]:
    """A directory for throwaway servers' data, removed afterwards, outside pytest's
    tmp_path: every pytest session that starts as the same user (another one running at the
    same time, on a shared machine) chmods /tmp/pytest-of-<user> back to 0700, which locks
    out the ``postgres`` OS user a root-run PostgresServer runs as: initdb then fails with
    "Permission denied" (on pg_control, or on the data directory itself)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


async def _postgres_answers(url: str) -> bool:
    try:
        conn = await asyncpg.connect(_with_database(url, "postgres"), timeout=2)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def recreate_database(url: str) -> None:
    """Drop and create the test database, so every run starts from the migrations."""
    name = urlsplit(url).path.lstrip("/")
    assert name.endswith("test") or "test" in name, f"refusing to drop non-test database {name}"
    conn = await asyncpg.connect(_with_database(url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f"CREATE DATABASE \"{name}\" ENCODING 'UTF8' TEMPLATE template0")
    finally:
        await conn.close()


def start_test_servers(redis_topology: str = "standalone") -> TestServers:
    """``redis_topology`` "sentinel": a throwaway primary, replica and three Sentinels
    (service/dev/sentinel.py), reached through ``redis+sentinel://``; "cluster": a
    throwaway Redis Cluster of three primaries with a replica each
    (service/dev/cluster.py), reached through ``redis+cluster://``; either whatever
    WBCACHE_TEST_REDIS_URL says."""
    redis_url = os.environ.get("WBCACHE_TEST_REDIS_URL", DEFAULT_TEST_REDIS_URL)
    database_url = os.environ.get("WBCACHE_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)
    owned: list[RedisServer | PostgresServer | SentinelTopology | ClusterTopology] = []
    base = Path(tempfile.mkdtemp(prefix="wbcache-test-servers-"))
    if redis_topology == "sentinel":
        topology = SentinelTopology(base / "sentinel")
        topology.start()
        owned.append(topology)
        redis_url = topology.url
    arq_redis_url = None
    if redis_topology in ("standalone", "cluster") and not _redis_answers(redis_url):
        r = RedisServer(base / "redis", appendonly=True)
        r.start()
        owned.append(r)
        redis_url = r.url
    if redis_topology == "cluster":
        # The standalone test Redis holds arq's wake-up queue (ARQ_REDIS_URL).
        arq_redis_url = redis_url
        cluster = ClusterTopology(base / "cluster", primaries=3, replicas_per_primary=1)
        cluster.start()
        owned.append(cluster)
        redis_url = cluster.url
    if not asyncio.run(_postgres_answers(database_url)):
        p = PostgresServer(base / "postgres", fsync=False)
        p.start()
        owned.append(p)
        database_url = _with_database(p.url, "wbcache_test")
    return TestServers(redis_url, database_url, owned, arq_redis_url)
