"""PgPool after close: no new pool (whose connections nobody would close)."""

from __future__ import annotations

import asyncpg
import pytest

from service.adapters.postgres import PgPool
from service.config import Settings
from service.core.errors import classify


async def test_get_after_close_opens_no_new_pool() -> None:
    pool = PgPool("test", Settings(database_url="postgresql://127.0.0.1:1/none"))
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError) as raised:
        await pool.get()
    assert pool._pool is None
    found = classify(raised.value, talking_to="postgres")
    assert found is not None and found.dependency == "postgres"
