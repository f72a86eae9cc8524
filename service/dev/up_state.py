"""What a running ``wbcache up`` started, as it writes it down in ``<data dir>/up.json``:
the other commands (``status``, ``drain``, ``dlq``, ``healthcheck``) run in the same
directory read it to talk to those servers when no URL is given."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.dev import processes

DATA_DIR = Path(".wbcache")
STATE_FILE = "up.json"


@dataclass(frozen=True)
class UpServers:
    """The URLs of a running ``up`` (pid ``pid``)."""

    pid: int
    api: str
    redis: str
    database: str


def urls_record(api: str, redis: str, database: str) -> dict[str, Any]:
    """up.json's ``urls`` entry."""
    return {"urls": {"api": api, "redis": redis, "database": database}}


def running_up(data_dir: Path = DATA_DIR) -> UpServers | None:
    """The servers of the ``up`` that runs on ``data_dir``; None when none runs there
    (no up.json, or the process it names has exited)."""
    try:
        state = json.loads((data_dir / STATE_FILE).read_text())
        urls = state["urls"]
        found = UpServers(
            int(state["pid"]), str(urls["api"]), str(urls["redis"]), str(urls["database"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return found if processes.recorded(state) is not None else None
