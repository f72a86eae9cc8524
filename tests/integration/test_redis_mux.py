"""The shared, auto-pipelined connection of the records hot path
(service/adapters/redis_mux.py) against real Redis servers: every caller gets its own
reply, in one connection; error replies are redis-py's exceptions and touch no other
command; a restart, a silent server and a cancelled caller fail only what they must."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.adapters.redis import create_redis
from service.adapters.redis_mux import RedisMux
from service.config import Settings
from tests.integration.test_redis_faults import throwaway_redis


@contextlib.asynccontextmanager
async def _mux(settings: Settings, timeout: float = 5.0) -> AsyncIterator[tuple[RedisMux, Redis]]:
    """A mux over the pool of the service's own client for ``settings`` (standalone or
    Sentinel), and that client, to look at Redis with."""
    control = create_redis(f"test-mux-{uuid.uuid4().hex[:8]}", settings)
    mux = RedisMux(control.connection_pool, timeout=timeout)
    try:
        yield mux, control
    finally:
        await mux.aclose()
        await control.aclose(close_connection_pool=True)


async def _connections_named(control: Redis, name: str) -> int:
    clients = await control.client_list()
    return sum(1 for c in clients if c.get("name") == name)


async def test_concurrent_callers_share_one_connection_and_get_their_own_replies(
    settings: Settings,
) -> None:
    prefix = f"{settings.redis_prefix}mux:"
    async with _mux(settings) as (mux, control):

        async def one(i: int) -> None:
            for n in range(20):
                assert await mux.execute("SET", f"{prefix}{i}", f"{i}.{n}") == b"OK"
                assert await mux.execute("GET", f"{prefix}{i}") == f"{i}.{n}".encode()
                fields = await mux.execute("HMGET", f"{prefix}h{i}", "a", "b")
                assert fields == [None, None]

        await asyncio.gather(*(one(i) for i in range(200)))
        name = mux._pool.connection_kwargs["client_name"]
        # The mux's connection, and the pooled one this CLIENT LIST goes over.
        assert await _connections_named(control, name) == 2
        await control.delete(*[f"{prefix}{i}" for i in range(200)])


async def test_error_replies_are_redis_py_exceptions_for_their_caller_alone(
    settings: Settings,
) -> None:
    key = f"{settings.redis_prefix}mux:list"
    async with _mux(settings) as (mux, control):
        await control.rpush(key, "x")  # type: ignore[misc]
        results = await asyncio.gather(
            mux.execute("EVALSHA", "0" * 40, 0),
            mux.execute("GET", key),  # WRONGTYPE
            mux.execute("LLEN", key),
            return_exceptions=True,
        )
        assert isinstance(results[0], NoScriptError), results
        assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])
        assert results[2] == 1
        await control.delete(key)


async def test_a_cancelled_caller_leaves_the_replies_in_step(settings: Settings) -> None:
    key = f"{settings.redis_prefix}mux:c"
    async with _mux(settings) as (mux, control):
        tasks = [asyncio.create_task(mux.execute("INCR", key)) for _ in range(50)]
        await asyncio.sleep(0)  # each has queued its command; none is written yet
        for task in tasks[::2]:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Sent all the same (cancelling a caller does not unsend its command); every later
        # caller still gets its own reply.
        assert await mux.execute("GET", key) == b"50"
        assert await asyncio.gather(*(mux.execute("INCR", key) for _ in range(5))) == [
            51,
            52,
            53,
            54,
            55,
        ]
        await control.delete(key)


async def test_a_restart_fails_nothing_sent_afterwards(
    tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    async with throwaway_redis(tmp_path / "redis", aof=True) as server:
        async with _mux(settings_factory(redis_url=server.url)) as (mux, _):
            assert await mux.execute("SET", "k", "1") == b"OK"
            await asyncio.to_thread(server.restart)
            # The old connection's close has reached the client: the next command goes
            # out on a new one.
            assert await mux.execute("GET", "k") == b"1"
            assert await asyncio.gather(*(mux.execute("INCR", "n") for _ in range(20))) == list(
                range(1, 21)
            )


async def test_a_silent_redis_fails_the_waiting_commands_after_the_timeout(
    tmp_path: Path, settings_factory: Callable[..., Settings]
) -> None:
    async with throwaway_redis(tmp_path / "redis") as server:
        async with _mux(settings_factory(redis_url=server.url), timeout=1.0) as (mux, _):
            assert await mux.execute("PING") == b"PONG"
            process = server._process
            assert process is not None
            process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises((RedisTimeoutError, RedisConnectionError)):
                    async with asyncio.timeout(10):
                        await mux.execute("PING")
            finally:
                process.send_signal(signal.SIGCONT)
            assert await mux.execute("PING") == b"PONG"


async def test_a_refused_connect_fails_the_waiting_commands(
    settings_factory: Callable[..., Settings],
) -> None:
    async with _mux(settings_factory(redis_url="redis://127.0.0.1:9/0")) as (mux, _):
        results = await asyncio.gather(
            *(mux.execute("PING") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results), results
