"""``wbcache migrate``: create the database if missing, then ``alembic upgrade head``.

The migrations ship inside the package, so this works from an installed wheel."""

from __future__ import annotations

import asyncio
from importlib.resources import files
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from alembic import command
from alembic.config import Config

from service.connections import asyncpg_dsn, sqlalchemy_url


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(files("service") / "migrations"))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(database_url).replace("%", "%%"))
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
    except asyncpg.DuplicateDatabaseError:
        return False  # another migrate created it at the same moment
    finally:
        await conn.close()


def migrate(database_url: str) -> None:
    asyncio.run(ensure_database(database_url))
    command.upgrade(alembic_config(database_url), "head")
