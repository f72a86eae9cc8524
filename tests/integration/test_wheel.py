"""`wbcache migrate` from an installed wheel, not a checkout: the migrations live in the
top-level alembic/ folder and must ship inside the wheel (as ``wbcache_migrations``), and
its options (``--hash-partitions``) must reach them there too."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from tests.support import servers as test_servers
from tests.support.servers import recreate_database

ROOT = Path(__file__).resolve().parents[2]


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def test_migrate_runs_from_the_wheel(servers: test_servers.TestServers, tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("wbcache-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert "wbcache_migrations/env.py" in names
    assert any(n.startswith("wbcache_migrations/versions/") for n in names)
    assert "service/core/lua/write.lua" in names
    # The Python client, typed: `from wbcache import Client` works from the wheel.
    assert {"wbcache/__init__.py", "wbcache/client.py", "wbcache/py.typed"} <= set(names)

    # Named after the session's test database, so parallel runs don't collide.
    name = urlsplit(servers.database_url).path.lstrip("/")
    url = _with_database(servers.database_url, f"{name}_wheel")
    partitioned = _with_database(servers.database_url, f"{name}_wheel_hp")

    def migrate(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
        asyncio.run(recreate_database(database_url))
        env = dict(os.environ, DATABASE_URL=database_url, PYTHONPATH=str(site))
        argv = ["wbcache", "migrate", *args]
        # Run from an empty folder, so nothing of the checkout can be imported.
        return subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, service; from service.adapters.migrate import migrations_dir; "
                "print(service.__file__); print(migrations_dir()); "
                f"from service.cli import app; sys.argv = {argv!r}; app()",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = migrate(url)
    assert out.returncode == 0, out.stdout + out.stderr
    service_file, migrations = out.stdout.splitlines()[:2]
    assert service_file.startswith(str(site)), service_file
    assert migrations == str(site / "wbcache_migrations"), migrations

    async def tables(database_url: str) -> dict[str, str]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT relname::text, relkind::text FROM pg_class "
                "WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'p')"
            )
        finally:
            await conn.close()
        return {r["relname"]: r["relkind"] for r in rows}

    try:
        assert {"records": "r", "tombstones": "r"}.items() <= asyncio.run(tables(url)).items()

        out = migrate(partitioned, "--hash-partitions", "4")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "into 4 partitions" in out.stdout, out.stdout
        assert asyncio.run(tables(partitioned)) == {
            "alembic_version": "r",
            "records": "p",
            "tombstones": "r",
            **{f"records_p{i}": "r" for i in range(4)},
        }
    finally:
        asyncio.run(_drop(url, partitioned))


async def _drop(*urls: str) -> None:
    for url in urls:
        conn = await asyncpg.connect(_with_database(url, "postgres"))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
        finally:
            await conn.close()
