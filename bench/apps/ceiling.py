"""The ceiling: what one FastAPI process on uvicorn answers with no storage at all.

``PUT /v1/{collection}/{key}`` reads the body, parses it with orjson and answers
``{"collection", "key", "version"}`` with an ``ETag``; ``GET`` answers a fixed ~200-byte
JSON document with an ``ETag``. Anything the service does beyond this costs throughput;
the suite reports the service's rates as ratios to these.

Run: ``uvicorn bench.apps.ceiling:app --loop uvloop --http httptools --no-access-log``.
"""

from __future__ import annotations

import itertools

import orjson
from fastapi import FastAPI, Request, Response

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

_versions = itertools.count(1)
_DOCUMENT = orjson.dumps(
    {
        "id": 1,
        "seq": 0,
        "name": "user-000001",
        "email": "user000001@example.com",
        "active": True,
        "score": 0.37,
        "tags": ["alpha", "beta"],
        "address": {"city": "Springfield", "zip": "00001"},
        "notes": "x" * 36,
    }
)
_DOCUMENT_ETAG = '"1"'


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b"{}", media_type="application/json")


@app.put("/v1/{collection}/{key}")
async def put_record(collection: str, key: str, request: Request) -> Response:
    body = await request.body()
    orjson.loads(body)
    version = next(_versions)
    return Response(
        orjson.dumps({"collection": collection, "key": key, "version": version}),
        200,
        {"ETag": f'"{version}"'},
        media_type="application/json",
    )


@app.get("/v1/{collection}/{key}")
async def get_record(collection: str, key: str) -> Response:
    return Response(_DOCUMENT, 200, {"ETag": _DOCUMENT_ETAG}, media_type="application/json")
