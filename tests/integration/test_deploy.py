"""The deployment files, without a Docker engine: the Dockerfile's CMD and HEALTHCHECK and
the compose services' ``command`` / ``healthcheck`` are run here exactly as written
(``wbcache`` resolved to this virtualenv's console script) against the test Redis and a
throwaway Postgres database, and the checks of ``make lint`` (scripts/check_deploy.py)
must pass and must catch broken files."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import jsonschema
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from scripts.check_deploy import (
    COUNTERS,
    GAUGES,
    HISTOGRAM_LABELS,
    HISTOGRAMS,
    SENTINEL_OVERLAY,
    DockerfileFacts,
    Problems,
    check_all,
    check_compose_doc,
    check_dockerfile,
    check_sentinel_doc,
    compose_schema,
    environment,
    healthcheck_argv,
    load_compose,
    merge_compose,
    parse_duration,
)
from service.dev.embedded import RedisServer, free_port
from tests.conftest import wait_until
from tests.support.procs import Proc
from tests.support.servers import TestServers as Servers
from tests.support.servers import data_dir

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def wbcache(argv: list[str]) -> list[str]:
    """An image's ``wbcache ...`` argv, run with this virtualenv's ``wbcache``."""
    assert argv[0] == "wbcache", argv
    script = Path(sys.executable).parent / "wbcache"
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    return [*exe, *argv[1:]]


async def run(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *wbcache(argv),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"`{' '.join(argv)}` still running after {timeout} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def _with_database(url: str, name: str) -> str:
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, f"/{name}", p.query, p.fragment))


@pytest.fixture
async def deploy_database(servers: Servers) -> AsyncIterator[str]:
    """A database that does not exist yet (``wbcache migrate`` must create it), dropped
    afterwards. Named after the session's test database, so parallel runs don't collide."""
    name = urlsplit(servers.database_url).path.lstrip("/") + "_deploy"
    admin_url = _with_database(servers.database_url, "postgres")

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    await drop()
    yield _with_database(servers.database_url, name)
    await drop()


def service_env(
    service: dict[str, Any], redis_url: str, database_url: str, prefix: str, **extra: str
) -> dict[str, str]:
    """The compose service's environment, with the URLs pointed at the test servers."""
    env = environment(service)
    # In the compose file they name the compose services; here the test servers stand in.
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["DATABASE_URL"]).hostname == "postgres"
    out = {k: v for k, v in os.environ.items() if k not in env}
    out.update(env)
    out.update(REDIS_URL=redis_url, DATABASE_URL=database_url, REDIS_PREFIX=prefix, **extra)
    return out


async def test_deploy_files_pass_the_checks() -> None:
    problems, _ = check_all(ROOT)
    assert problems == [], "\n".join(problems)


async def test_image_and_compose_commands_run_against_the_test_servers(
    servers: Servers, deploy_database: str, prefix: str, tmp_path: Path
) -> None:
    facts = check_dockerfile(ROOT, Problems())
    assert facts.cmd is not None and facts.healthcheck is not None
    # With API keys on, as in production: the probes must not need one.
    doc, _ = load_compose(COMPOSE, {"API_KEYS": "deploy-test-key:admin"})
    services: dict[str, Any] = doc["services"]
    heartbeat = tmp_path / "worker.heartbeat"
    extra = {
        "WORKER_HEARTBEAT_FILE": str(heartbeat),
        "WRITE_DELAY_MS": "50",
        "SWEEP_SECONDS": "1",
        "LEASE_SECONDS": "3",
    }

    def env_of(name: str) -> dict[str, str]:
        return service_env(services[name], servers.redis_url, deploy_database, prefix, **extra)

    # migrate: creates the database and the tables; `docker compose up` runs it on every
    # start, so a second run must succeed too.
    migrate_cmd = services["migrate"]["command"]
    for _ in range(2):
        rc, out = await run(migrate_cmd, env_of("migrate"), timeout=120)
        assert rc == 0, out
    conn = await asyncpg.connect(deploy_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('records') IS NOT NULL")

        # serve: the Dockerfile's CMD, the port being the one thing changed (8000 may be
        # taken here); compose's api runs the same command line (the checker asserts it).
        assert services["api"]["command"] == facts.cmd
        port = free_port()
        serve = list(facts.cmd)
        serve[serve.index("--port") + 1] = str(port)
        base = f"http://127.0.0.1:{port}"
        api = Proc(wbcache(serve), env_of("api"), tmp_path / "api.log").start()
        worker: Proc | None = None
        try:
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:

                async def healthz() -> bool:
                    assert api.popen is not None
                    assert api.popen.poll() is None, api.output()[-3000:]
                    try:
                        return (await client.get("/healthz")).status_code == 200
                    except httpx.TransportError:
                        return False

                await wait_until(healthz, timeout=60, interval=0.1)

                # The image's HEALTHCHECK and compose's, pointed at this port.
                api_probe = healthcheck_argv(services["api"]["healthcheck"]["test"])
                assert api_probe is not None
                for probe in (facts.healthcheck, api_probe):
                    rc, out = await run([*probe, "--url", base], env_of("api"), timeout=30)
                    assert rc == 0, out
                dead = f"http://127.0.0.1:{free_port()}"
                rc, _ = await run([*facts.healthcheck, "--url", dead], env_of("api"), timeout=30)
                assert rc != 0, "the API healthcheck passes with no API listening"

                # worker: unhealthy before it runs, healthy within a bounded wait after.
                worker_probe = healthcheck_argv(services["worker"]["healthcheck"]["test"])
                assert worker_probe is not None
                rc, _ = await run(worker_probe, env_of("worker"), timeout=30)
                assert rc != 0, "the worker healthcheck passes with no worker running"
                worker = Proc(
                    wbcache(services["worker"]["command"]), env_of("worker"), tmp_path / "w.log"
                ).start()

                async def worker_healthy() -> bool:
                    assert worker is not None and worker.popen is not None
                    assert worker.popen.poll() is None, worker.output()[-3000:]
                    rc, _ = await run(worker_probe, env_of("worker"), timeout=30)
                    return rc == 0

                await wait_until(worker_healthy, timeout=60, interval=0.5)

                # A write through the API reaches the migrated database.
                resp = await client.put("/v1/deploy/k1", json={"n": 1})
                assert resp.status_code == 401, "API_KEYS from the compose file not applied"
                client.headers["Authorization"] = "Bearer deploy-test-key"
                resp = await client.put("/v1/deploy/k1", json={"n": 1})
                assert resp.status_code == 201, resp.text
                version = resp.json()["version"]

                async def persisted() -> Any:
                    return await conn.fetchrow(
                        "SELECT value::text AS value, version FROM records "
                        "WHERE collection = 'deploy' AND key = 'k1'"
                    )

                row = await wait_until(persisted, timeout=60, interval=0.1)
                assert row["version"] == version
                assert row["value"] == '{"n": 1}'
                assert (await client.get("/v1/deploy/k1")).json() == {"n": 1}

                # Every metric the dashboard and the alerts read is exported.
                text = (await client.get("/metrics")).text
                families = {f.name: f for f in text_string_to_metric_families(text)}
                exported = set(families)
                for name in GAUGES | HISTOGRAMS:
                    assert name in exported, f"{name} not exported"
                for name in COUNTERS:
                    assert name.removesuffix("_total") in exported, f"{name} not exported"
                for name, labels in HISTOGRAM_LABELS.items():
                    samples = families[name].samples
                    assert any(labels <= set(s.labels) for s in samples), (name, samples[:3])

            # SIGTERM, as `docker compose stop` sends: each stops cleanly within its grace
            # period. The worker exits 0; uvicorn, after its graceful shutdown, re-raises
            # the signal (exit -SIGTERM, 143 in a container).
            clean_exit = {"worker": (0,), "api": (0, -signal.SIGTERM)}
            for proc, name in ((worker, "worker"), (api, "api")):
                assert proc is not None
                grace = parse_duration(services[name].get("stop_grace_period", "10s"))
                assert grace is not None
                started = time.monotonic()
                proc.signal(signal.SIGTERM)
                rc_exit = proc.wait(grace)
                assert rc_exit in clean_exit[name], (
                    f"{name}: exit {rc_exit} {time.monotonic() - started:.1f} s after SIGTERM "
                    f"(grace {grace} s)\n{proc.output()[-3000:]}"
                )
            assert "Application shutdown complete" in api.output()
        finally:
            if worker is not None:
                worker.stop()
            api.stop()
    finally:
        await conn.close()


# --- the checker catches broken compose files --------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        if value is None:
            del node[last]
        else:
            node[last] = value

    return apply


BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "short worker grace",
        _set("services.worker.stop_grace_period", "30s"),
        "stop_grace_period must exceed 30 s",
    ),
    (
        "worker container_name",
        _set("services.worker.container_name", "wbcache-worker"),
        "container_name prevents --scale",
    ),
    ("worker host port", _set("services.worker.ports", ["9000:9000"]), "published port"),
    (
        "api starts before redis is healthy",
        _set("services.api.depends_on.redis.condition", "service_started"),
        "depends_on redis: condition service_healthy",
    ),
    (
        "worker does not wait for migrations",
        _set("services.worker.depends_on.migrate", None),
        "depends_on migrate: condition service_completed_successfully",
    ),
    (
        "migrate restarts forever",
        _set("services.migrate.restart", "unless-stopped"),
        "a one-shot must not restart",
    ),
    (
        "not a subcommand",
        _set("services.worker.command", ["wbcache", "wrker"]),
        "`wbcache wrker` is not a subcommand",
    ),
    (
        "an option the CLI rejects",
        _set("services.api.command", ["wbcache", "serve", "--prot", "8000"]),
        "No such option",
    ),
    (
        "worker probed as an API",
        _set("services.worker.healthcheck.test", ["CMD", "wbcache", "healthcheck", "api"]),
        "healthcheck must be `wbcache healthcheck worker`",
    ),
    ("redis without a healthcheck", _set("services.redis.healthcheck", None), "no healthcheck"),
    (
        "redis evicting pending writes",
        _set(
            "services.redis.command",
            ["redis-server", "--appendonly", "yes", "--maxmemory-policy", "allkeys-lru"],
        ),
        "--maxmemory-policy must be one of",
    ),
    (
        "worker on another database",
        _set(
            "services.worker.environment.DATABASE_URL",
            "postgresql://wbcache:wbcache@postgres:5432/other",
        ),
        "DATABASE_URL does not match",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"), [(b[1], b[2]) for b in BROKEN], ids=[b[0] for b in BROKEN]
)
async def test_checker_rejects_broken_compose(
    change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc, _ = load_compose(COMPOSE)
    facts = check_dockerfile(ROOT, Problems())
    clean = Problems()
    check_compose_doc(doc, facts, clean)
    assert clean == []
    broken = copy.deepcopy(doc)
    change(broken)
    problems = Problems()
    check_compose_doc(broken, DockerfileFacts(), problems)
    assert any(expected in p for p in problems), problems


async def test_schema_rejects_what_compose_rejects() -> None:

    validator = jsonschema.Draft7Validator(compose_schema())
    doc, _ = load_compose(COMPOSE)
    assert list(validator.iter_errors(doc)) == []
    for change in (
        _set("services.worker.stop_grace_periods", "45s"),  # a typo
        _set("services.api.depends_on.redis.condition", "healthy"),
        _set("services.api.healthcheck.test", 42),
    ):
        broken = copy.deepcopy(doc)
        change(broken)
        assert list(validator.iter_errors(broken)), "schema accepted a broken file"


async def test_compose_interpolation_defaults_and_overrides() -> None:
    doc, missing = load_compose(COMPOSE)
    assert missing == set()
    url = environment(doc["services"]["worker"])["DATABASE_URL"]
    assert url == "postgresql://wbcache:wbcache@postgres:5432/wbcache"
    doc, _ = load_compose(COMPOSE, {"POSTGRES_PASSWORD": "s3cret", "WBCACHE_PORT": "9000"})
    services = doc["services"]
    assert environment(services["postgres"])["POSTGRES_PASSWORD"] == "s3cret"
    assert "s3cret@postgres" in environment(services["api"])["DATABASE_URL"]
    assert services["api"]["ports"] == ["9000:8000"]


# --------------------------------------------------------------------------- Sentinel


def _sentinel_merged() -> dict[str, Any]:
    overlay, missing = load_compose(ROOT / SENTINEL_OVERLAY)
    assert missing == set()
    base, _ = load_compose(COMPOSE)
    return merge_compose(base, overlay)


def _drop(service: str) -> Callable[[dict[str, Any]], None]:
    return _set(f"services.{service}", None)


def _redis_url(url: str) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        for name in ("migrate", "api", "worker"):
            doc["services"][name]["environment"]["REDIS_URL"] = url

    return apply


def _replica_flag(flag: str, value: str) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        argv = doc["services"]["redis-replica"]["command"]
        argv[argv.index(flag) + 1] = value

    return apply


def _sentinel_script(edit: Callable[[str], str]) -> Callable[[dict[str, Any]], None]:
    def apply(doc: dict[str, Any]) -> None:
        command = doc["services"]["sentinel-2"]["command"]
        command[-1] = edit(command[-1])

    return apply


SENTINEL_BROKEN: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("two sentinels", _drop("sentinel-3"), "run an odd number"),
    ("no replica", _drop("redis-replica"), "no replica"),
    (
        "another master name",
        _redis_url("redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/x/0"),
        "is not the monitored",
    ),
    (
        "a sentinel missing from the URL",
        _redis_url("redis+sentinel://sentinel-1:26379,sentinel-2:26379/wbcache/0"),
        "REDIS_URL names",
    ),
    ("standalone URL", _redis_url("redis://redis:6379/0"), "must be a redis+sentinel:// URL"),
    ("replica without AOF", _replica_flag("--appendonly", "no"), "--appendonly yes"),
    ("replica may evict", _replica_flag("--maxmemory-policy", "allkeys-lru"), "maxmemory-policy"),
    (
        "quorum of one",
        _sentinel_script(lambda s: s.replace("wbcache redis 6379 2", "wbcache redis 6379 1")),
        "no majority",
    ),
    (
        "monitors another node",
        _sentinel_script(lambda s: s.replace("wbcache redis 6379", "wbcache redis-replica 6379")),
        "must monitor the redis service",
    ),
    ("api before the sentinels", _set("services.api.depends_on.sentinel-1", None), "depends_on"),
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [(b[1], b[2]) for b in SENTINEL_BROKEN],
    ids=[b[0] for b in SENTINEL_BROKEN],
)
async def test_checker_rejects_broken_sentinel_overlay(
    change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    doc = _sentinel_merged()
    clean = Problems()
    check_compose_doc(doc, None, clean, where="overlay")
    check_sentinel_doc(doc, "overlay", clean)
    assert clean == []
    broken = copy.deepcopy(doc)
    change(broken)
    problems = Problems()
    check_compose_doc(broken, None, problems, where="overlay")
    check_sentinel_doc(broken, "overlay", problems)
    assert any(expected in p for p in problems), problems


def _sentinel_master(port: int, name: str) -> dict[str, str]:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2, decode_responses=True)
    try:
        state = client.execute_command("SENTINEL", "MASTER", name)  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return dict(zip(state[::2], state[1::2], strict=True))


async def test_sentinel_overlay_commands_run(tmp_path: Path) -> None:
    """The overlay's replica and Sentinel commands, run as written (compose host names and
    paths pointed at loopback and a temporary directory): the replica syncs from a primary
    and the Sentinel's generated config monitors it and finds the replica."""
    services = _sentinel_merged()["services"]
    with data_dir("wbcache-deploy-sentinel-") as base:
        primary = RedisServer(base / "primary")
        primary.start()
        replica_argv = services["redis-replica"]["command"]
        at = replica_argv.index("--replicaof")
        replica = RedisServer(
            base / "replica",
            extra_args=[
                *replica_argv[1:at],
                "--replicaof",
                "127.0.0.1",
                str(primary.port),
                "--replica-announce-ip",
                "127.0.0.1",
            ],
        )
        sentinel_dir = base / "sentinel"
        sentinel_dir.mkdir()
        port = free_port()
        script = (
            services["sentinel-1"]["command"][-1]
            .replace("/data/", f"{sentinel_dir}/")
            .replace("port 26379", f"port {port}")
            .replace("wbcache redis 6379", f"wbcache 127.0.0.1 {primary.port}")
            .replace("exec redis-server", f"exec {primary.binary}")
        )
        proc = Proc(
            ["sh", "-c", script],
            {**os.environ, "SENTINEL_ANNOUNCE": "127.0.0.1"},
            tmp_path / "sentinel.log",
        )
        try:
            replica.start()
            proc.start()

            async def knows_the_replica() -> bool:
                try:
                    state = await asyncio.to_thread(_sentinel_master, port, "wbcache")
                except redis.RedisError:  # not up yet
                    return False
                return state.get("num-slaves") == "1" and state.get("port") == str(primary.port)

            await wait_until(knows_the_replica, timeout=30, interval=0.2)
            conf = (sentinel_dir / "sentinel.conf").read_text()
            assert "down-after-milliseconds wbcache 5000" in conf, conf
        finally:
            proc.stop()
            replica.stop()
            primary.stop()
