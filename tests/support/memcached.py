"""The API in-process with its memcached door on a free port, and raw protocol access for
tests that need to see exact bytes (the clients hide them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from service.api.app import create_app
from service.config import Settings


@dataclass
class Door:
    """The running API: its HTTP client and the memcached port."""

    http: httpx.AsyncClient
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.asynccontextmanager
async def running_door(settings: Settings) -> AsyncIterator[Door]:
    settings = settings.model_copy(update={"memcached_port": 0})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        server = app.state.memcached
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://wbcache") as http:
            yield Door(http, server.host, server.port)


class Raw:
    """One TCP connection speaking the protocol by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, door: Door) -> Raw:
        reader, writer = await asyncio.open_connection(door.host, door.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def line(self, timeout: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.reader.readline(), timeout)

    async def exactly(self, n: int, timeout: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(n), timeout)

    async def ask(self, data: bytes) -> bytes:
        """Send ``data`` and read one reply line."""
        await self.send(data)
        return await self.line()

    async def until_end(self, end: bytes = b"END\r\n") -> bytes:
        return await asyncio.wait_for(self.reader.readuntil(end), 10.0)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
