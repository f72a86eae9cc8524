"""The ``wbcache`` command."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from service.config import Settings, get_settings

app = typer.Typer(help="wbcache: a write-behind cache in front of Postgres.", no_args_is_help=True)

RedisOpt = Annotated[
    str | None,
    typer.Option(
        "--redis-url",
        help="Overrides REDIS_URL; without either, the Redis of the `wbcache up` running in "
        "this directory",
    ),
]
DbOpt = Annotated[str | None, typer.Option("--database-url", help="Overrides DATABASE_URL")]


def _settings(redis_url: str | None = None, database_url: str | None = None) -> Settings:
    if redis_url:
        os.environ["REDIS_URL"] = redis_url
    if database_url:
        os.environ["DATABASE_URL"] = database_url
    get_settings.cache_clear()
    try:
        return get_settings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]).upper()
            typer.echo(f"wbcache: {where}: {error['msg']}", err=True)
        raise typer.Exit(2) from None


# What `healthcheck api` probes when no `wbcache up` runs in the directory (containers).
DEFAULT_API_URL = "http://127.0.0.1:8000"


def _operator_settings(redis_url: str | None) -> Settings:
    """Settings for the operator commands: REDIS_URL from ``--redis-url``, else the
    environment, else the `wbcache up` that runs in this directory (said on stderr)."""
    if not redis_url and not os.environ.get("REDIS_URL"):
        from service.dev.up_state import DATA_DIR, running_up
        from service.redaction import redact_url

        up = running_up()
        if up is not None:
            where = f"{redact_url(up.redis)}, started by `wbcache up` (pid {up.pid}, {DATA_DIR}/)"
            typer.echo(f"wbcache: Redis {where}", err=True)
            redis_url = up.redis
    return _settings(redis_url)


class _NotServed(Exception):
    """The Redis answered, but no API or worker of the service ever used it."""


@app.command()
def migrate(
    database_url: DbOpt = None,
    hash_partitions: Annotated[
        int | None,
        typer.Option(
            "--hash-partitions",
            min=2,
            max=1024,
            metavar="N",
            help="Create records PARTITION BY HASH (collection, key) into N partitions "
            "(records_p0 ...). Only when records does not exist yet: with the "
            "same N again it is a no-op, with another layout it is refused (exit 2).",
        ),
    ] = None,
) -> None:
    """Create the database if missing and apply the migrations (alembic upgrade head).
    Idempotent; safe when several run at once. Exit 2 when the settings are invalid or
    records exists with another layout than --hash-partitions asks for (converting is an
    offline job: docs/scaling.md, "Past one Postgres")."""
    from service.adapters.logs import setup
    from service.adapters.migrate import migrate as run
    from service.adapters.partitions import LayoutMismatch

    settings = _settings(database_url=database_url)
    setup(settings.log_level, settings.log_json)
    try:
        layout = run(settings.database_url, hash_partitions)
    except LayoutMismatch as exc:
        typer.echo(f"wbcache migrate: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo("migrations applied" + (f"; records is {layout.describe()}" if layout else ""))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
    redis_url: RedisOpt = None,
    database_url: DbOpt = None,
    memcached_port: Annotated[
        int | None,
        typer.Option(
            help="Also serve the memcached protocol on this port (MEMCACHED_PORT; bound to "
            "MEMCACHED_BIND, 127.0.0.1 by default: the protocol has no authentication)"
        ),
    ] = None,
) -> None:
    """Run the HTTP API (uvicorn with uvloop and httptools)."""
    import uvicorn

    from service.adapters.http_server import LimitedHttpToolsProtocol, raise_open_files_limit
    from service.adapters.logs import setup

    if memcached_port is not None:  # the app factory reads its settings from the environment
        os.environ["MEMCACHED_PORT"] = str(memcached_port)
    settings = _settings(redis_url, database_url)
    setup(settings.log_level, settings.log_json)
    if not settings.api_keys and host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("wbcache.serve").warning(
            "API_KEYS is not set and the API binds %s: anyone who can reach it can read "
            "and write every record. Set API_KEYS=key:scope,...",
            host,
        )
    raise_open_files_limit(settings.http_max_connections)
    uvicorn.run(
        "service.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        # httptools, with a head size limit, head/body deadlines and a connection cap.
        http=LimitedHttpToolsProtocol,
        ws="none",  # the API has no WebSocket route: no Upgrade takes a connection away
        timeout_keep_alive=settings.http_keep_alive_timeout_seconds,
        # SIGTERM: stop accepting, finish in-flight requests within this bound.
        timeout_graceful_shutdown=10,
        log_level=settings.log_level.lower(),
        # uvicorn's loggers go through setup()'s handler (LOG_JSON), not a config of its own.
        log_config=None,
        access_log=False,
    )


@app.command()
def worker(redis_url: RedisOpt = None, database_url: DbOpt = None) -> None:
    """Run one worker that persists accepted writes (run as many as you like)."""
    from service.adapters.logs import setup
    from worker.main import run

    settings = _settings(redis_url, database_url)
    setup(settings.log_level, settings.log_json)
    run(settings)


@app.command()
def up(
    host: Annotated[str, typer.Option(help="Address the API binds")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API")] = 8000,
    data_dir: Annotated[str, typer.Option(help="Where embedded servers keep data")] = ".wbcache",
) -> None:
    """Everything for a laptop: embedded Redis/Postgres for unset URLs, migrations, API and
    one worker. Ctrl-C drains and stops all of it."""
    from service.dev.up import run

    raise typer.Exit(run(host=host, port=port, data_dir=data_dir))


@app.command()
def healthcheck(
    kind: Annotated[str, typer.Argument(help="api or worker")] = "api",
    url: Annotated[
        str | None,
        typer.Option(
            help="API base URL (kind api); default: the `wbcache up` running in this "
            "directory, else http://127.0.0.1:8000"
        ),
    ] = None,
    max_age: Annotated[float, typer.Option(help="Max heartbeat age in s (kind worker)")] = 30.0,
) -> None:
    """Exit 0 when healthy: the API answers /healthz, or this machine's worker wrote its
    heartbeat file recently (for container health checks)."""
    import urllib.request

    if kind == "worker":
        path = get_settings().worker_heartbeat_file
        try:
            age = time.time() - os.path.getmtime(path)
        except OSError:
            typer.echo(f"no worker heartbeat at {path}", err=True)
            raise typer.Exit(1) from None
        if age > max_age:
            typer.echo(f"worker heartbeat is {age:.0f} s old", err=True)
            raise typer.Exit(1)
        typer.echo(f"worker heartbeat {age:.1f} s ago")
        return
    if url is None:
        from service.dev.up_state import running_up

        up = running_up()
        url = up.api if up is not None else DEFAULT_API_URL
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=3) as resp:
            ok = resp.status == 200
    except OSError as exc:
        typer.echo(f"API not healthy at {url}: {exc}", err=True)
        raise typer.Exit(1) from None
    if not ok:
        raise typer.Exit(1)
    typer.echo("API healthy")


def _print_status(s: dict[str, Any]) -> None:
    age = s["oldest_pending_age_s"]
    rows = [
        ("pending", s["pending"]),
        ("oldest pending age", f"{age:.1f} s" if age is not None else "-"),
        ("queued jobs", s["queued_jobs"]),
        ("batches in flight", s["batches_in_flight"]),
        ("dead letters", s["dead_letters"]),
        ("live workers", s["workers"]),
        ("flush rate (1 min)", f"{s['flush_rate_per_s']}/s"),
        ("flushed (total)", s["flushed"]),
        ("flush failures", s["flush_failures"]),
        ("hits / misses", f"{s['hits']} / {s['misses']}"),
    ]
    for name, value in rows:
        typer.echo(f"{name:<20} {value}")
    if s["last_flush_error"]:
        typer.echo(f"{'last flush error':<20} {s['last_flush_error']['error']}")
    if s["pending"] and not s["workers"]:
        typer.secho("WARNING: writes are pending and no worker is alive", fg="red", err=True)


async def _with_redis(settings: Settings, fn: Any) -> Any:
    """``fn(redis, shards, arq)`` with clients of REDIS_URL (and ARQ_REDIS_URL)."""
    from arq.connections import ArqRedis

    from service.adapters.redis import close_redis, connect_redis, create_arq_redis
    from service.core import stats
    from service.core.shards import Shards

    redis = connect_redis("cli", settings)
    arq = None if isinstance(redis, ArqRedis) else create_arq_redis("cli", settings)
    try:
        shards = Shards.from_settings(settings)
        # An empty queue on a Redis the service never used would read as "all persisted".
        if not await stats.served(redis, shards):
            raise _NotServed
        return await fn(redis, shards, arq)
    finally:
        await close_redis(redis)
        if arq is not None:
            await close_redis(arq)


def _collect(settings: Settings) -> dict[str, Any]:
    from service.core import stats

    async def collect(redis: Any, shards: Any, arq: Any) -> dict[str, Any]:
        return await stats.collect(redis, shards, arq=arq)

    result: dict[str, Any] = _run_on_redis(settings, collect)
    return result


def _run_on_redis(settings: Settings, fn: Any) -> Any:
    """``_with_redis(settings, fn)``; exit 2, saying why, when Redis does not answer or is
    not one the service uses."""
    from service.redaction import redact_url

    url = redact_url(settings.redis_url)
    try:
        return asyncio.run(_with_redis(settings, fn))
    except _NotServed:
        typer.secho(
            f"no wbcache API or worker has used the Redis at {url} (prefix "
            f"{settings.redis_prefix!r}), so its empty queue says nothing. Point the command "
            "at the service's Redis with --redis-url or REDIS_URL (after `wbcache up`, run "
            "it in the directory where `up` runs).",
            fg="red",
            err=True,
        )
        raise typer.Exit(2) from None
    except Exception as exc:
        typer.secho(f"cannot read the queue from Redis at {url}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from exc


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    watch: Annotated[
        float | None, typer.Option("--watch", help="Refresh every N seconds until Ctrl-C")
    ] = None,
    redis_url: RedisOpt = None,
) -> None:
    """Queue depth, lag, dead letters and live workers. Exit 1 when writes are pending
    and no worker is alive."""

    settings = _operator_settings(redis_url)
    while True:
        s = _collect(settings)
        if as_json:
            typer.echo(json.dumps(s))
        else:
            if watch:
                typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the screen
            _print_status(s)
        if not watch:
            break
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            break
    if s["pending"] and not s["workers"]:
        raise typer.Exit(1)


@app.command()
def drain(
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds")] = 300.0,
    redis_url: RedisOpt = None,
) -> None:
    """Wait until every accepted write is persisted (pending = 0). Exit 0 when drained,
    1 on timeout, 3 when drained but dead letters remain."""

    settings = _operator_settings(redis_url)
    deadline = time.monotonic() + timeout
    start = _collect(settings)["pending"]
    with typer.progressbar(length=max(start, 1), label="draining", show_pos=True) as bar:
        done = 0
        while True:
            s = _collect(settings)
            progressed = max(0, start - s["pending"]) if start else 1
            if progressed > done:
                bar.update(progressed - done)
                done = progressed
            if s["pending"] == 0:
                break
            if time.monotonic() > deadline:
                typer.secho(
                    f"\ntimed out after {timeout:.0f} s: {s['pending']} pending, "
                    f"{s['workers']} live workers",
                    fg="red",
                    err=True,
                )
                raise typer.Exit(1)
            time.sleep(0.2)
    if s["dead_letters"]:
        typer.secho(
            f"drained, but {s['dead_letters']} dead letters remain (wbcache dlq list)",
            fg="yellow",
            err=True,
        )
        raise typer.Exit(3)
    typer.echo("drained: every accepted write is persisted")


dlq = typer.Typer(help="Dead letters: writes Postgres refused for good.", no_args_is_help=True)
app.add_typer(dlq, name="dlq")

ItemsArg = Annotated[
    list[str] | None,
    typer.Argument(help="collection/key items (none = all); the key may contain '/'"),
]


def _items(items: list[str] | None) -> list[tuple[str, str]] | None:
    if not items:
        return None
    out = []
    for item in items:
        collection, sep, key = item.partition("/")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not collection/key")
        out.append((collection, key))
    return out


def _dead_letters(settings: Settings, action: str, items: list[str] | None) -> Any:
    from service.core.deadletters import DeadLetters
    from service.core.scripts import Scripts

    async def run(redis: Any, shards: Any, arq: Any) -> Any:
        dl = DeadLetters(redis, shards, Scripts.register(redis), arq)
        if action == "list":
            out: list[dict[str, Any]] = []
            cursor = ""
            while True:
                page, cursor = await dl.page(cursor, 500)
                out.extend(page)
                if not cursor:
                    return out
        if action == "retry":
            return await dl.retry(_items(items))
        return await dl.drop(_items(items))

    return _run_on_redis(settings, run)


@dlq.command("list")
def dlq_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output")] = False,
    redis_url: RedisOpt = None,
) -> None:
    """List dead letters with their error."""
    items = _dead_letters(_operator_settings(redis_url), "list", None)
    if as_json:
        typer.echo(json.dumps(items))
        return
    if not items:
        typer.echo("no dead letters")
    for d in items:
        typer.echo(
            f"{d['collection']}/{d['key']}  version={d['version']}  "
            f"sqlstate={d['sqlstate']}  {str(d['error']).splitlines()[0]}"
        )


@dlq.command("retry")
def dlq_retry(items: ItemsArg = None, redis_url: RedisOpt = None) -> None:
    """Put dead letters back in the queue (after fixing the cause)."""
    done = _dead_letters(_operator_settings(redis_url), "retry", items)
    typer.echo(f"retried {len(done)}")


@dlq.command("drop")
def dlq_drop(
    items: ItemsArg = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation")] = False,
    redis_url: RedisOpt = None,
) -> None:
    """Discard dead-lettered writes; reads then show what Postgres holds."""
    if not yes:
        typer.confirm("Discard these writes for good?", abort=True)
    done = _dead_letters(_operator_settings(redis_url), "drop", items)
    typer.echo(f"dropped {len(done)}")


if __name__ == "__main__":
    app()
