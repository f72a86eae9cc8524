"""Purge requests to a Varnish edge with the xkey vmod (deploy/varnish/default.vcl):
``PURGE /`` with the surrogate keys in ``xkey-purge``, over a connection of its own.

A few lines of asyncio rather than an HTTP client library: one request line, three
headers and a status code is all a purge needs, and the worker gains no dependency."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

# Header bytes per purge request: Varnish refuses a header line longer than
# http_req_hdr_len (8 KiB by default).
MAX_HEADER_BYTES = 6000


class EdgeError(Exception):
    """The edge did not confirm a purge (unreachable, too slow, or not a 2xx)."""


def chunks(keys: Sequence[str], limit: int = MAX_HEADER_BYTES) -> Iterator[list[str]]:
    """``keys`` in groups whose space-separated text fits ``limit`` bytes."""
    group: list[str] = []
    size = 0
    for key in keys:
        if group and size + 1 + len(key) > limit:
            yield group
            group, size = [], 0
        group.append(key)
        size += len(key) + (1 if size else 0)
    if group:
        yield group


class Edge:
    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an edge's purge URL must be http://host[:port]: {base_url!r}")
        self.url = base_url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.netloc = parts.netloc
        self.path = (parts.path.rstrip("/") or "") + "/"
        self.timeout = timeout

    def ready_in(self) -> float:
        return 0.0  # no rate limit: Varnish takes purges as they come

    async def purge(self, keys: Sequence[str]) -> int:
        """Drop every object filed under any of ``keys``; returns the requests made.
        Raises EdgeError when a request is not confirmed."""
        sent = 0
        for group in chunks(keys):
            await self._request(" ".join(group))
            sent += 1
        return sent

    async def _request(self, header: str) -> None:
        request = (
            f"PURGE {self.path} HTTP/1.1\r\nHost: {self.netloc}\r\n"
            f"xkey-purge: {header}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ).encode("ascii")
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                try:
                    writer.write(request)
                    await writer.drain()
                    status_line = await reader.readline()
                    await reader.read()  # to the end: Connection: close
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError) as exc:
            raise EdgeError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        fields = status_line.split(None, 2)
        if len(fields) < 2 or not fields[1].isdigit() or not 200 <= int(fields[1]) < 300:
            raise EdgeError(f"{self.url} answered the purge with {status_line.strip()!r}")
