"""Alembic environment: the database comes from the service's settings, through asyncpg.

An advisory lock serializes concurrent ``wbcache migrate`` runs: the second waits, then
finds nothing to do. ``config.attributes`` carries the options of ``wbcache migrate``
(set by service.adapters.migrate, so they reach here from an installed wheel too):
``hash_partitions`` (N or None), the layout asked for ``records``; checked against an
existing table under the lock, so of concurrent runs asking for different layouts only
the first creates the table and the others are refused. The layout the table has
afterwards goes back in ``records_layout``."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from alembic import context
from service.adapters.partitions import check_layout, read_layout

MIGRATION_LOCK = 0x77626361  # "wbca"


def _run(connection: Connection) -> None:
    attributes = context.config.attributes
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
    try:
        check_layout(connection, attributes.get("hash_partitions"))
        context.configure(
            connection=connection, target_metadata=None, transaction_per_migration=True
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
        attributes["records_layout"] = read_layout(connection)
    finally:
        connection.rollback()
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()


async def _main() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    assert url, "sqlalchemy.url is set by service.adapters.migrate"
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=context.config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_main())
