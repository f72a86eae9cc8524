"""create_app() and the lifespan that owns the process' connections and periodic tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files

from arq.connections import ArqRedis
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.adapters.postgres import PgPool
from service.adapters.redis import connect_redis, create_arq_redis, create_mux
from service.adapters.redis_check import check_redis_durability
from service.api import batch, dashboard, deadletters, errors, listing, ops, records
from service.api.auth import ApiKeys, Guard
from service.api.cache_headers import CacheHeaders
from service.api.lane import RecordsLane, WbcacheApp
from service.api.memcached.server import open_door
from service.api.metrics import Metrics
from service.api.middleware import RequestContext
from service.api.state import AppState, HitCounters
from service.config import Settings, get_settings
from service.core import stats
from service.core.deadletters import DeadLetters
from service.core.errors import REDIS_DOWN
from service.core.flusher import Flusher
from service.core.records import RecordStore
from service.core.repository import ping
from service.core.scripts import Scripts
from service.core.shards import Shards
from service.core.write_through import WriteThrough

log = logging.getLogger("wbcache.app")

# Allocations between two young-generation collections (Python's default: 700). A request
# allocates containers that live until it answers: a POST /v1/batch of 100 puts about
# 1,500 (its parsed documents), so with 16 of them in flight the default collected every
# few hundred microseconds and traversed the same live documents again and again, ~20 %
# of the API's CPU under the batch bench (API CPU per write 47-49 -> 38 µs at 10,000,
# twice, 6 runs each; 50,000 did no better). Cyclic garbage waits a little longer: a few
# MB at most, peak RSS unchanged.
GC_GEN0_THRESHOLD = 10_000


async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception as exc:  # keep the loop alive; the next round tries again
            log.debug("periodic task failed: %s", exc)


def build_state(
    settings: Settings, process: str = "api", metrics: Metrics | None = None
) -> AppState:
    redis = connect_redis(process, settings)
    arq = redis if isinstance(redis, ArqRedis) else create_arq_redis(process, settings)
    pg = PgPool(process, settings)
    scripts = Scripts.register(redis)
    counters = HitCounters()
    shards = Shards.from_settings(settings)
    mux = create_mux(redis, settings)
    return AppState(
        settings=settings,
        shards=shards,
        redis=redis,
        arq=arq,
        pg=pg,
        store=RecordStore(redis, pg, settings, scripts, on_hit=counters.record, arq=arq, mux=mux),
        write_through=WriteThrough(Flusher(redis, pg, settings, scripts)),
        counters=counters,
        metrics=metrics or Metrics(),
        dead_letters=DeadLetters(redis, shards, scripts, arq),
        cache_headers=CacheHeaders(settings),
        mux=mux,
    )


def _offline_docs(app: FastAPI) -> None:
    """/docs and /redoc with their assets served by the app, not a CDN."""
    static = files("fastapi_offline") / "static"
    app.mount("/docs/static", StaticFiles(directory=str(static)), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="wbcache API",
            swagger_js_url="/docs/static/swagger-ui-bundle.js",
            swagger_css_url="/docs/static/swagger-ui.css",
            swagger_favicon_url="/docs/static/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="wbcache API",
            redoc_js_url="/docs/static/redoc.standalone.js",
            redoc_favicon_url="/docs/static/favicon.png",
            with_google_fonts=False,
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings, metrics=app.state.metrics)
        app.state.wb = state
        try:
            state.redis_config_warnings = await check_redis_durability(
                state.redis, settings.redis_min_replicas
            )
            await stats.mark_served(state.redis, state.shards)
        except REDIS_DOWN as exc:
            log.error("Redis is not answering at start (%s); record requests answer 503", exc)

        async def probe_postgres() -> None:
            try:
                await asyncio.wait_for(ping(await state.pg.get()), timeout=2.0)
                state.postgres_status = "up"
            except Exception as exc:
                state.postgres_status = f"down: {type(exc).__name__}: {exc}"

        await probe_postgres()
        thresholds = gc.get_threshold()
        gc.set_threshold(GC_GEN0_THRESHOLD, *thresholds[1:])
        tasks = [
            asyncio.create_task(_every(1.0, state.flush_counters)),
            asyncio.create_task(_every(2.0, probe_postgres)),
        ]
        door = None
        try:
            # The memcached door (MEMCACHED_PORT): same loop, store and metrics as HTTP. A
            # port it cannot bind fails the start, after the cleanup below.
            if settings.memcached_port is not None:
                door = await open_door(
                    settings, state.store, state.write_through, state.metrics.observe_memcached
                )
            app.state.memcached = door
            yield
        finally:
            if door is not None:
                await door.aclose()
            for t in tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await state.flush_counters()
            gc.set_threshold(*thresholds)
            await state.aclose()

    app = WbcacheApp(
        docs_url=None,
        redoc_url=None,
        title="wbcache",
        version="0.1.0",
        summary="A write-behind cache: writes land in Redis at once, workers persist them "
        "to Postgres in batches; reads are cache-aside.",
        lifespan=lifespan,
    )
    errors.install(app)
    _offline_docs(app)
    metrics = Metrics()
    app.state.metrics = metrics
    # What each route declares it needs is checked against these (service/api/auth.py).
    guard = Guard(ApiKeys.parse(settings.api_keys), settings.metrics_public)
    app.state.guard = guard
    app.add_middleware(RequestContext, metrics=metrics)
    # Record requests skip FastAPI's stack (service/api/lane.py); the router below holds
    # the same route table for the OpenAPI schema.
    app.records_lane = RequestContext(RecordsLane(guard), metrics)
    app.include_router(records.router)
    app.include_router(ops.router)
    app.include_router(deadletters.router)
    app.include_router(batch.router)
    app.include_router(dashboard.router)
    # Last: /v1/{collection} must not shadow the fixed paths above (/v1/stats, ...).
    app.include_router(listing.router)
    return app
