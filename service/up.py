"""``wbcache up``: everything for a laptop (placeholder until the ship issue lands)."""

from __future__ import annotations


def run(host: str, port: int, data_dir: str) -> int:
    raise NotImplementedError("wbcache up arrives with the ship issue")
