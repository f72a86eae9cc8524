"""Dead letters: list, retry, drop (single-segment paths: never a record route)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, Field

from service.api.auth import ADMIN, ScopedRoute, requires
from service.api.deps import StateDep
from service.api.errors import ERROR_RESPONSES, ApiError, json_response
from service.api.http import COLLECTION_RE

router = APIRouter(
    prefix="/v1",
    tags=["dead letters"],
    responses=ERROR_RESPONSES,
    route_class=ScopedRoute,
    dependencies=[requires(ADMIN)],
)


class ItemRef(BaseModel):
    collection: Annotated[str, Field(pattern=COLLECTION_RE.pattern)]
    key: Annotated[str, Field(min_length=1, max_length=512)]


class ItemsRequest(BaseModel):
    items: Annotated[list[ItemRef] | None, Field(max_length=10_000)] = None


def _refs(body: ItemsRequest | None) -> list[tuple[str, str]] | None:
    if body is None or body.items is None:
        return None
    return [(i.collection, i.key) for i in body.items]


@router.get("/dead-letters", summary="List dead letters (cursor-paginated)")
async def list_dead_letters(
    state: StateDep,
    cursor: Annotated[str, Query(max_length=2048)] = "",
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    try:
        items, next_cursor = await state.dead_letters.page(cursor, limit)
        total = await state.dead_letters.count()
    except ValueError as exc:
        raise ApiError(400, "bad_cursor", str(exc)) from exc
    return json_response({"items": items, "next_cursor": next_cursor or None, "total": total})


@router.post("/dead-letters:retry", summary="Put dead letters back in the queue (absent = all)")
async def retry_dead_letters(state: StateDep, body: ItemsRequest | None = None) -> Response:
    done = await state.dead_letters.retry(_refs(body))
    return json_response({"retried": len(done)})


@router.post(
    "/dead-letters:drop",
    summary="Discard dead letters and evict their cached entries (absent = all)",
)
async def drop_dead_letters(state: StateDep, body: ItemsRequest | None = None) -> Response:
    done = await state.dead_letters.drop(_refs(body))
    return json_response({"dropped": len(done)})
