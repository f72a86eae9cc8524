"""The operator's command line, run as users run it (``python -m service.cli``, i.e. the
``wbcache`` console script) against the test Redis and Postgres: ``status``, ``drain``
and ``dlq list|retry|drop``, their output and their exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from arq.worker import Worker

from service.config import Settings
from tests.conftest import running_worker, wait_drained, wait_until
from tests.support.procs import settings_env, wbcache_argv


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float


async def wbcache(settings: Settings, *args: str, timeout: float = 60.0) -> Result:
    """Run ``wbcache <args>`` without blocking this event loop (a worker may run in it)."""
    env = settings_env(settings)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *wbcache_argv(*args),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"wbcache {' '.join(args)} did not finish within {timeout} s"
        ) from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode(), time.monotonic() - started)


def table(text: str) -> dict[str, str]:
    """``status`` output: one "name   value" row per line, names padded to 20 columns."""
    rows = {}
    for line in text.splitlines():
        if line.strip():
            rows[line[:20].strip()] = line[20:].strip()
    return rows


@contextlib.asynccontextmanager
async def poison_constraint(pg: asyncpg.Connection) -> AsyncIterator[Callable[[], Any]]:
    name = f"wbt_poison_{uuid.uuid4().hex[:10]}"
    await pg.execute(f"ALTER TABLE records ADD CONSTRAINT {name} CHECK (NOT (value ? 'poison'))")

    async def drop() -> None:
        await pg.execute(f"ALTER TABLE records DROP CONSTRAINT IF EXISTS {name}")

    try:
        yield drop
    finally:
        await drop()


async def stats(api: httpx.AsyncClient) -> dict[str, Any]:
    s: dict[str, Any] = (await api.get("/v1/stats")).json()
    return s


async def settled(api: httpx.AsyncClient, dead: int, timeout: float = 30.0) -> None:
    async def check() -> bool:
        s = await stats(api)
        return bool(s["pending"] == 0 and s["dead_letters"] == dead)

    await wait_until(check, timeout)


async def test_status_table_json_and_exit_codes(
    api: httpx.AsyncClient, settings: Settings, settings_factory: Callable[..., Settings]
) -> None:
    # Nothing pending, no worker: all is well.
    r = await wbcache(settings, "status")
    assert r.code == 0, r
    rows = table(r.stdout)
    for name in ("pending", "oldest pending age", "dead letters", "live workers"):
        assert name in rows, r.stdout
    assert rows["pending"] == "0"
    assert "WARNING" not in r.stdout + r.stderr

    for i in range(3):
        assert (await api.put(f"/v1/cli/k{i}", json={"i": i})).status_code == 201
    await api.put("/v1/cli/k0", json={"i": 0, "again": True})  # still one pending key

    # Pending writes and no worker alive: exit 1 and say so loudly.
    r = await wbcache(settings, "status")
    assert r.code == 1, r
    rows = table(r.stdout)
    assert rows["pending"] == "3"
    assert rows["live workers"] == "0"
    assert rows["oldest pending age"].endswith(" s")
    assert "WARNING" in r.stderr and "no worker" in r.stderr, r.stderr

    r = await wbcache(settings, "status", "--json")
    assert r.code == 1, r
    machine = json.loads(r.stdout)
    s = await stats(api)
    assert machine["pending"] == s["pending"] == 3
    assert machine["dead_letters"] == s["dead_letters"] == 0
    assert machine["workers"] == 0
    assert machine["oldest_pending_age_s"] is not None and machine["oldest_pending_age_s"] >= 0

    # A live worker that has not flushed yet (long write delay): pending, but exit 0.
    slow = settings_factory(write_delay_ms=600_000)
    async with running_worker(slow):
        await wait_until(lambda: _workers_alive(api), timeout=20)
        r = await wbcache(settings, "status")
        assert r.code == 0, r
        rows = table(r.stdout)
        assert rows["pending"] == "3" and rows["live workers"] == "1"
        assert "WARNING" not in r.stdout + r.stderr


async def _workers_alive(api: httpx.AsyncClient) -> bool:
    return bool((await stats(api))["workers"] >= 1)


async def test_drain_exit_codes(
    api: httpx.AsyncClient, settings: Settings, pg: asyncpg.Connection
) -> None:
    for i in range(5):
        assert (await api.put(f"/v1/cli/k{i}", json={"i": i})).status_code == 201

    # Nobody drains it: gives up after the timeout with exit 1.
    r = await wbcache(settings, "drain", "--timeout", "2")
    assert r.code == 1, r
    assert r.seconds >= 2
    assert "timed out" in r.stderr and "5 pending" in r.stderr, r.stderr

    # With a worker it drains: exit 0, and everything is in Postgres.
    async with running_worker(settings):
        r = await wbcache(settings, "drain", "--timeout", "60")
        assert r.code == 0, r
        assert "drained" in r.stdout
        assert (await stats(api))["pending"] == 0
        assert await pg.fetchval("SELECT count(*) FROM records WHERE collection = 'cli'") == 5

        # Nothing pending: returns at once with 0.
        r = await wbcache(settings, "drain", "--timeout", "2")
        assert r.code == 0, r


async def test_drain_exits_3_with_dead_letters_and_dlq_commands(
    api: httpx.AsyncClient, worker: Worker, settings: Settings, pg: asyncpg.Connection
) -> None:
    async with poison_constraint(pg) as fix:
        good = (await api.put("/v1/cli/good", json={"ok": True})).json()["version"]
        bad = (await api.put("/v1/cli/bad", json={"poison": 1})).json()["version"]
        # A key with a '/' in it (%2F in the URL).
        slash = (await api.put("/v1/cli/x%2Fy", json={"poison": 2})).json()["version"]
        await settled(api, dead=2)

        r = await wbcache(settings, "drain", "--timeout", "30")
        assert r.code == 3, r
        assert "2 dead letters" in r.stderr, r.stderr

        r = await wbcache(settings, "dlq", "list")
        assert r.code == 0, r
        # One entry per dead letter (the error text may carry Postgres' DETAIL lines).
        lines = sorted(line for line in r.stdout.splitlines() if line.startswith("cli/"))
        assert len(lines) == 2, r.stdout
        assert lines[0].startswith(f"cli/bad  version={bad}  sqlstate=23514")
        assert lines[1].startswith(f"cli/x/y  version={slash}  sqlstate=23514")
        assert "check constraint" in lines[0]

        r = await wbcache(settings, "dlq", "list", "--json")
        assert r.code == 0, r
        listed = {
            (d["collection"], d["key"], d["version"], d["sqlstate"]) for d in json.loads(r.stdout)
        }
        assert listed == {("cli", "bad", bad, "23514"), ("cli", "x/y", slash, "23514")}

        # Without --yes (and nobody to answer): refuses, changes nothing.
        r = await wbcache(settings, "dlq", "drop", "cli/x/y")
        assert r.code != 0, r
        assert (await stats(api))["dead_letters"] == 2

        r = await wbcache(settings, "dlq", "drop", "--yes", "cli/x/y")
        assert r.code == 0, r
        assert "dropped 1" in r.stdout
        got = await api.get("/v1/cli/x%2Fy")
        assert got.status_code == 404 and got.headers["x-cache"] == "miss"

        await fix()
        r = await wbcache(settings, "dlq", "retry", "cli/bad")
        assert r.code == 0, r
        assert "retried 1" in r.stdout
        await settled(api, dead=0)
        rows = {
            row["key"]: row["version"]
            for row in await pg.fetch("SELECT key, version FROM records WHERE collection = 'cli'")
        }
        assert rows == {"good": good, "bad": bad}

        r = await wbcache(settings, "dlq", "list")
        assert r.code == 0 and "no dead letters" in r.stdout, r
        r = await wbcache(settings, "drain", "--timeout", "10")
        assert r.code == 0, r

        # A malformed item is a usage error.
        r = await wbcache(settings, "dlq", "retry", "no-slash")
        assert r.code == 2, r


async def test_drain_against_a_worker_process(
    api: httpx.AsyncClient, settings: Settings, procs: Callable[..., Any], pg: asyncpg.Connection
) -> None:
    for i in range(50):
        assert (await api.put(f"/v1/cli/p{i}", json={"i": i})).status_code == 201
    procs("worker")
    r = await wbcache(settings, "drain", "--timeout", "60")
    assert r.code == 0, r
    assert await pg.fetchval("SELECT count(*) FROM records WHERE collection = 'cli'") == 50
    await wait_drained(api)


@pytest.mark.parametrize("command", [("status",), ("worker",), ("serve", "--port", "1")])
async def test_a_malformed_redis_url_exits_2_with_what_to_fix(
    settings: Settings, command: tuple[str, ...]
) -> None:
    result = await wbcache(
        settings, *command, "--redis-url", "redis+sentinel://127.0.0.1:1", timeout=30
    )
    assert result.code == 2, result
    assert "REDIS_URL" in result.stderr and "no master name" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", [("status",), ("drain",), ("dlq", "list")])
async def test_a_redis_the_service_never_used_is_no_healthy_empty_queue(
    settings_factory: Callable[..., Settings], command: tuple[str, ...]
) -> None:
    """The test Redis answers, but no API or worker ever ran under this prefix: its empty
    queue is not the service's, so the command says so and exits 2 (it used to print
    "drained" and "no dead letters", exit 0)."""
    unused = settings_factory(redis_prefix=f"never-{uuid.uuid4().hex[:8]}:")
    r = await wbcache(unused, *command)
    assert r.code == 2, r
    assert "no wbcache API or worker has used the Redis" in r.stderr, r.stderr
    assert "drained" not in r.stdout and "no dead letters" not in r.stdout, r.stdout


async def test_a_redis_that_does_not_answer_exits_2(settings: Settings) -> None:
    r = await wbcache(settings, "status", "--redis-url", "redis://127.0.0.1:1/0", timeout=30)
    assert r.code == 2, r
    assert "cannot read the queue from Redis at redis://127.0.0.1:1/0" in r.stderr, r.stderr
