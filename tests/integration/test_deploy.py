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
from prometheus_client.parser import text_string_to_metric_families

from scripts.check_deploy import (
    COUNTERS,
    GAUGES,
    HISTOGRAM_LABELS,
    HISTOGRAMS,
    DockerfileFacts,
    Problems,
    check_all,
    check_compose_doc,
    check_dockerfile,
    compose_schema,
    environment,
    healthcheck_argv,
    load_compose,
    parse_duration,
)
from service.dev.embedded import free_port
from tests.conftest import wait_until
from tests.support.procs import Proc
from tests.support.servers import TestServers as Servers

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
