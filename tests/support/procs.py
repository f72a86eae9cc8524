"""Run ``wbcache serve`` / ``wbcache worker`` as real processes (what users run), for tests
that kill, restart or load them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from service.config import Settings
from service.dev.embedded import free_port


def service_env(redis_url: str, database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, REDIS_PREFIX=prefix)
    env.update(extra)
    return env


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a service process ``settings``' Redis, Postgres, prefix
    and shards."""
    env = service_env(settings.redis_url, settings.database_url, settings.redis_prefix)
    if settings.redis_shards is not None:
        env["REDIS_SHARDS"] = str(settings.redis_shards)
    if settings.arq_redis_url:
        env["ARQ_REDIS_URL"] = settings.arq_redis_url
    return env


def wbcache_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


class Proc:
    def __init__(self, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.argv = argv
        self.env = dict(env)
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def signal(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def terminate(self, timeout: float = 30) -> int | None:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            if self.terminate(15) is None:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class ApiProc(Proc):
    def __init__(self, env: Mapping[str, str], log: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        super().__init__(wbcache_argv("serve", "--port", str(self.port)), env, log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProc:
        super().start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"wbcache serve exited:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"wbcache serve did not start:\n{self.output()[-3000:]}")


class WorkerProc(Proc):
    def __init__(self, env: Mapping[str, str], log: Path) -> None:
        super().__init__(wbcache_argv("worker"), env, log)
