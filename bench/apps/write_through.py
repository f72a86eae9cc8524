"""Synchronous write-through, the usual way: the answer waits for Postgres.

``PUT /v1/{collection}/{key}``: read and parse the body (orjson), upsert the row in
Postgres (one statement, one commit, the version incremented by the database), then
``SET`` the entry in Redis, then answer ``{"collection", "key", "version"}`` with an
``ETag``. ``GET``: the entry from Redis, else the row from Postgres (then cached), with
its ``ETag``; 404 when absent.

Settings from the environment: ``WT_DATABASE_URL`` (its table ``wt_records`` is created if
missing), ``WT_REDIS_URL``, ``WT_REDIS_PREFIX`` (default ``wt:``), ``WT_PG_POOL`` (asyncpg
pool size, default 16), ``WT_TTL_SECONDS`` (default 3600).

Run: ``uvicorn bench.apps.write_through:app --loop uvloop --http httptools --no-access-log``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Response

DATABASE_URL = os.environ.get("WT_DATABASE_URL", "postgresql://127.0.0.1:5432/wbcache_bench")
REDIS_URL = os.environ.get("WT_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("WT_REDIS_PREFIX", "wt:")
POOL_SIZE = int(os.environ.get("WT_PG_POOL", "16"))
TTL_SECONDS = int(os.environ.get("WT_TTL_SECONDS", "3600"))

CREATE = """
CREATE TABLE IF NOT EXISTS wt_records (
    collection text NOT NULL,
    key text NOT NULL,
    value jsonb NOT NULL,
    version bigint NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (collection, key)
)
"""

UPSERT = """
INSERT INTO wt_records AS r (collection, key, value, version, updated_at)
VALUES ($1, $2, $3::jsonb, 1, now())
ON CONFLICT (collection, key) DO UPDATE
SET value = excluded.value, version = r.version + 1, updated_at = excluded.updated_at
RETURNING r.version, (r.xmax = 0) AS created
"""

SELECT = "SELECT value::text AS value, version FROM wt_records WHERE collection = $1 AND key = $2"


class State:
    pool: asyncpg.Pool
    redis: aioredis.Redis


state = State()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state.pool = await asyncpg.create_pool(DATABASE_URL, min_size=POOL_SIZE, max_size=POOL_SIZE)
    await state.pool.execute(CREATE)
    state.redis = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield
    finally:
        await state.redis.aclose()
        await state.pool.close()


app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)


def _entry(collection: str, key: str) -> str:
    return f"{PREFIX}{collection}:{key}"


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b"{}", media_type="application/json")


@app.put("/v1/{collection}/{key}")
async def put_record(collection: str, key: str, request: Request) -> Response:
    document = orjson.dumps(orjson.loads(await request.body()))
    row: Any = await state.pool.fetchrow(UPSERT, collection, key, document.decode())
    version = int(row["version"])
    await state.redis.set(_entry(collection, key), b"%d:%s" % (version, document), ex=TTL_SECONDS)
    return Response(
        orjson.dumps({"collection": collection, "key": key, "version": version}),
        201 if row["created"] else 200,
        {"ETag": f'"{version}"'},
        media_type="application/json",
    )


@app.get("/v1/{collection}/{key}")
async def get_record(collection: str, key: str) -> Response:
    cached: bytes | None = await state.redis.get(_entry(collection, key))
    if cached is not None:
        version, _, document = cached.partition(b":")
        cache = "hit"
    else:
        row: Any = await state.pool.fetchrow(SELECT, collection, key)
        if row is None:
            return Response(b'{"error":"not found"}', 404, media_type="application/json")
        document = row["value"].encode()
        version = b"%d" % row["version"]
        await state.redis.set(_entry(collection, key), version + b":" + document, ex=TTL_SECONDS)
        cache = "miss"
    return Response(
        document,
        200,
        {"ETag": f'"{version.decode()}"', "X-Cache": cache},
        media_type="application/json",
    )
