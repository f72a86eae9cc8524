"""``wbcache migrate``: create the database if missing, then ``alembic upgrade head``.

The migrations (the top-level alembic/ folder) ship in the wheel as the package
``wbcache_migrations``, so this works from an installed wheel too. Options reach them as
Alembic config attributes (in-process, no alembic.ini): ``hash_partitions``, see
service.adapters.partitions."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from alembic.config import Config

from alembic import command
from service.adapters.partitions import Layout, check_count
from service.adapters.postgres import asyncpg_dsn, sqlalchemy_url


def migrations_dir() -> Path:
    """Where ``wbcache_migrations`` is: alembic/ in a checkout or an editable install, the
    package's folder in a wheel. (A namespace package: importlib.resources cannot list an
    editable one on Python 3.11, so take the folder from the import spec.)"""
    spec = importlib.util.find_spec("wbcache_migrations")
    assert spec is not None and spec.submodule_search_locations is not None
    for location in spec.submodule_search_locations:
        if (Path(location) / "env.py").is_file():
            return Path(location)
    raise RuntimeError("the wbcache migrations are not installed (reinstall wbcache)")


def alembic_config(database_url: str, hash_partitions: int | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
    cfg.attributes["hash_partitions"] = (
        None if hash_partitions is None else check_count(hash_partitions)
    )
    return cfg


async def ensure_database(database_url: str) -> bool:
    """Create the database (UTF8) if it does not exist; True if created."""
    dsn = asyncpg_dsn(database_url)
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    try:
        conn = await asyncpg.connect(dsn)
        await conn.close()
        return False
    except asyncpg.InvalidCatalogNameError:
        pass
    admin = urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, parts.fragment))
    conn = await asyncpg.connect(admin)
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await conn.execute(f"CREATE DATABASE {quoted} ENCODING 'UTF8' TEMPLATE template0")
        return True
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        # Another migrate created it at the same moment: 42P04 when its commit came
        # first, a unique violation on pg_database's name when both were in flight.
        return False
    finally:
        await conn.close()


def migrate(database_url: str, hash_partitions: int | None = None) -> Layout | None:
    """Apply the migrations; with ``hash_partitions`` N, a ``records`` table still to be
    created is hash-partitioned into N, and an existing one of another layout raises
    LayoutMismatch (nothing changed). Returns the layout ``records`` has afterwards."""
    cfg = alembic_config(database_url, hash_partitions)
    asyncio.run(ensure_database(database_url))
    command.upgrade(cfg, "head")
    layout: Layout | None = cfg.attributes.get("records_layout")
    return layout
