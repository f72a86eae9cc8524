"""Documents and merge patches nest at most MAX_DEPTH levels: deeper ones are refused 422
``too_deep`` before anything is written (a batch with one is refused whole)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from service.core.documents import MAX_DEPTH

JSON = {"Content-Type": "application/json"}
MERGE = {"Content-Type": "application/merge-patch+json"}


def nested(depth: int) -> Any:
    """An object ``depth`` levels deep: {"a": {"a": ... 1}}."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def body(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


DEEP = "<deep>"


def batch(ops: list[dict[str, Any]], depth: int) -> bytes:
    """A batch body whose DEEP placeholders are ``depth`` levels deep (built as bytes:
    JSON encoders recurse)."""
    return orjson.dumps({"operations": ops}).replace(b'"<deep>"', body(depth))


@pytest.fixture
def c() -> str:
    return f"dj{uuid.uuid4().hex[:12]}"


def assert_too_deep(r: httpx.Response) -> None:
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "too_deep"


async def test_put_and_patch_deeper_than_the_limit_are_422(api: httpx.AsyncClient, c: str) -> None:
    for depth in (MAX_DEPTH + 1, 1000, 2000):
        assert_too_deep(await api.put(f"/v1/{c}/new", content=body(depth), headers=JSON))
    assert (await api.get(f"/v1/{c}/new")).status_code == 404

    r = await api.put(f"/v1/{c}/k", content=body(MAX_DEPTH), headers=JSON)
    assert r.status_code == 201
    version = r.headers["etag"]
    for depth in (MAX_DEPTH + 1, 1000, 2000):
        assert_too_deep(await api.patch(f"/v1/{c}/k", content=body(depth), headers=MERGE))
    got = await api.get(f"/v1/{c}/k")
    assert got.headers["etag"] == version and got.json() == nested(MAX_DEPTH)

    # At the limit, a patch is merged.
    r = await api.patch(f"/v1/{c}/k", content=body(MAX_DEPTH), headers=MERGE)
    assert r.status_code == 200 and r.json() == nested(MAX_DEPTH)
    assert r.headers["etag"] != version


async def test_batch_with_one_op_too_deep_is_refused_whole(api: httpx.AsyncClient, c: str) -> None:
    await api.put(f"/v1/{c}/old", json={"v": 1})
    version = (await api.get(f"/v1/{c}/old")).headers["etag"]
    for depth in (MAX_DEPTH + 1, 1000):
        deep_ops: list[dict[str, Any]] = [
            {"op": "put", "collection": c, "key": "deep", "document": DEEP},
            {"op": "patch", "collection": c, "key": "old", "patch": DEEP},
        ]
        for deep in deep_ops:
            ops: list[dict[str, Any]] = [
                {"op": "put", "collection": c, "key": "first", "document": {"n": 1}},
                {"op": "put", "collection": c, "key": "old", "document": {"v": 2}},
                {"op": "delete", "collection": c, "key": "old"},
                deep,
            ]
            r = await api.post("/v1/batch", content=batch(ops, depth), headers=JSON)
            assert_too_deep(r)
    # Nothing was written.
    assert (await api.get(f"/v1/{c}/first")).status_code == 404
    got = await api.get(f"/v1/{c}/old")
    assert got.json() == {"v": 1} and got.headers["etag"] == version

    ops = [
        {"op": "put", "collection": c, "key": "deep", "document": DEEP},
        {"op": "patch", "collection": c, "key": "old", "patch": DEEP},
    ]
    r = await api.post("/v1/batch", content=batch(ops, MAX_DEPTH), headers=JSON)
    assert [res["status"] for res in r.json()["results"]] == [201, 200], r.text
    assert (await api.get(f"/v1/{c}/deep")).json() == nested(MAX_DEPTH)
