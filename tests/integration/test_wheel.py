"""`wbcache migrate` from an installed wheel, not a checkout: the migrations live in the
top-level alembic/ folder and must ship inside the wheel (as ``wbcache_migrations``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zipfile
from pathlib import Path

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

    url = _with_database(servers.database_url, "wbcache_wheel_test")
    asyncio.run(recreate_database(url))
    env = dict(os.environ, DATABASE_URL=url, PYTHONPATH=str(site))
    # Run from an empty folder, so nothing of the checkout can be imported.
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, service; from service.adapters.migrate import migrations_dir; "
            "print(service.__file__); print(migrations_dir()); "
            "from service.cli import app; sys.argv = ['wbcache', 'migrate']; app()",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    service_file, migrations = out.stdout.splitlines()[:2]
    assert service_file.startswith(str(site)), service_file
    assert migrations == str(site / "wbcache_migrations"), migrations

    async def tables() -> set[str]:
        conn = await asyncpg.connect(url)
        try:
            rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        finally:
            await conn.close()
        return {r["tablename"] for r in rows}

    assert {"records", "tombstones"} <= asyncio.run(tables())
