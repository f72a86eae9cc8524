"""A minimal HTTP/1.1 keep-alive client for load generation.

On a 2-core machine the load generator shares the CPU with the API, Redis, Postgres and the
worker, so it must be cheap: requests are pre-encoded bytes written to a plain asyncio
stream, and only the status line, ``Content-Length`` / chunked framing and (optionally) the
body are parsed. One :class:`Connection` carries one request at a time; concurrency comes
from many connections.
"""

from __future__ import annotations

import asyncio
import contextlib


class HttpError(RuntimeError):
    """The server closed the connection or answered something that is not HTTP/1.1."""


def encode_request(
    method: str,
    path: str,
    host: str,
    body: bytes = b"",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The bytes of one request (``path`` must already be percent-encoded)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body or method in ("PUT", "POST", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Connection:
    """One keep-alive connection; reconnects transparently after the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def send(self, raw: bytes) -> tuple[int, bytes]:
        """Send one pre-encoded request; return (status, body). A connection error closes
        the connection (the next call reconnects) and propagates; except that a reused
        connection the server closed while idle (keep-alive timeout) is reopened and the
        request sent again once, as HTTP clients do (nothing of it reached the server)."""
        reused = self._writer is not None
        try:
            return await self._send(raw)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            idle_close = isinstance(exc, ConnectionError) or not exc.partial
            if not (reused and idle_close):
                raise
        return await self._send(raw)

    async def _send(self, raw: bytes) -> tuple[int, bytes]:
        try:
            reader, writer = await self._open()
            writer.write(raw)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            status, length, chunked, close = _parse_head(head)
            if chunked:
                body = await _read_chunked(reader)
            elif length:
                body = await reader.readexactly(length)
            else:
                body = b""
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, HttpError):
            await self.close()
            raise
        if close:
            await self.close()
        return status, body


def _parse_head(head: bytes) -> tuple[int, int, bool, bool]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise HttpError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
    status = int(parts[1])
    length = 0
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    return status, length, chunked, close


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # trailers (normally none) end with an empty line
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        await reader.readexactly(2)
