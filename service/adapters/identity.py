"""The name a process gives its connections, so API and worker connections can be told
apart in Redis ``CLIENT LIST`` and Postgres ``pg_stat_activity``."""

from __future__ import annotations

import os
import socket


def client_name(process: str) -> str:
    return f"wbcache-{process}-{socket.gethostname()}-{os.getpid()}"
