"""Operations: health, readiness, queue statistics, invalidation, metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, field_validator
from redis.exceptions import RedisError

from service.api.auth import ADMIN, METRICS, PUBLIC, READ, ScopedRoute, requires
from service.api.deps import StateDep
from service.api.errors import ERROR_RESPONSES, json_response
from service.api.http import COLLECTION_RE, MAX_KEY_BYTES
from service.api.state import AppState
from service.core import stats
from service.core.errors import classify
from service.redaction import redacted_settings

router = APIRouter(tags=["operations"], responses=ERROR_RESPONSES, route_class=ScopedRoute)


async def current_stats(state: AppState, raw_counters: bool = False) -> dict[str, Any]:
    try:
        await state.flush_counters()
    except Exception as exc:
        # Stats are reads: a Redis that refuses writes (at maxmemory, a replica) still
        # answers them; this process' hit counts wait for the next flush.
        if classify(exc) is None:
            raise
    return await stats.collect(state.redis, state.shards, raw_counters, state.arq)


@router.get(
    "/healthz", dependencies=[requires(PUBLIC)], summary="Liveness: 200 while the process runs"
)
async def healthz() -> Response:
    return json_response({"status": "ok"})


# What /readyz says of a Redis that answers but cannot take writes, by error code.
_REDIS_STATES = {
    "redis_full": "full",
    "redis_readonly": "readonly",
    "redis_loading": "loading",
    "redis_busy": "busy",
}


def _redis_state(exc: BaseException) -> str | None:
    """ "full: ...", "readonly: ...", "down: ..." for a Redis failure; None for a bug."""
    unavailable = classify(exc)
    if unavailable is None or unavailable.dependency != "redis":
        return None
    word = _REDIS_STATES.get(unavailable.code)
    if word is None:
        return f"down: {type(exc).__name__}: {exc}"
    return f"{word}: {unavailable.detail}"


@router.get(
    "/readyz",
    dependencies=[requires(PUBLIC)],
    summary="Readiness: 200 while Redis accepts writes",
)
async def readyz(state: StateDep) -> Response:
    body: dict[str, Any] = {"postgres": state.postgres_status}
    refused: str | None = None
    try:
        async with asyncio.timeout(1.0):
            await state.redis.ping()
            try:
                # At maxmemory, or as a replica, Redis answers reads but refuses writes:
                # only a write tells (a tiny one, gone in seconds).
                await state.redis.set(state.shards.any.ready_probe, b"1", px=10_000)
            except RedisError as exc:
                refused = _redis_state(exc)
                if refused is None:
                    raise
            s = await stats.collect(state.redis, state.shards, arq=state.arq)
    except Exception as exc:
        down = _redis_state(exc)
        if down is None:
            raise
        body.update(status="unavailable", redis=down)
        return json_response(body, 503, {"Retry-After": "1"})
    body.update(
        status="unavailable" if refused else "ready",
        redis=refused or "up",
        workers=f"{s['workers']} alive" if s["workers"] else "none alive",
        pending=s["pending"],
    )
    if state.redis_config_warnings:
        body["warnings"] = state.redis_config_warnings
    if refused:
        return json_response(body, 503, {"Retry-After": "1"})
    return json_response(body)


@router.get(
    "/v1/stats",
    dependencies=[requires(READ)],
    summary="Queue depth, lag, dead letters, workers, hit ratio",
)
async def get_stats(state: StateDep) -> Response:
    s = await current_stats(state)
    per = await stats.pending_by_collection(state.redis, state.shards)
    s["pending_by_collection"] = per["counts"]
    s["pending_by_collection_exact"] = per["exact"]
    return json_response(s)


@router.get("/metrics", dependencies=[requires(METRICS)], summary="Prometheus text exposition")
async def metrics(state: StateDep) -> Response:
    s = await current_stats(state, raw_counters=True)
    return Response(state.metrics.render(s), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/v1/config",
    dependencies=[requires(READ)],
    summary="The effective configuration (secrets redacted)",
)
async def get_config(state: StateDep) -> Response:
    return json_response(redacted_settings(state.settings))


class InvalidateRequest(BaseModel):
    collection: Annotated[str, Field(pattern=COLLECTION_RE.pattern)]
    keys: Annotated[list[str] | None, Field(max_length=10_000)] = None

    @field_validator("keys")
    @classmethod
    def _valid_keys(cls, keys: list[str] | None) -> list[str] | None:
        for k in keys or []:
            if not 1 <= len(k.encode()) <= MAX_KEY_BYTES:
                raise ValueError(f"a key is 1-{MAX_KEY_BYTES} bytes")
            if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in k):
                raise ValueError("a key cannot contain control characters")
        return keys


@router.post(
    "/v1/invalidate",
    dependencies=[requires(ADMIN)],
    summary="Drop cached copies so the next read loads Postgres",
)
async def invalidate(request: InvalidateRequest, state: StateDep) -> Response:
    dropped, skipped = await state.store.invalidate(request.collection, request.keys)
    return json_response({"invalidated": dropped, "skipped_pending": skipped})
