"""Throwaway Redis Sentinel topologies (tests, benchmarks): a primary, its replicas and
Sentinels, all ``redis-server`` processes on free loopback ports (the Sentinels run as
``redis-server <config> --sentinel``, the config file being theirs to rewrite)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import redis

from service.dev.redis_server import RedisServer
from service.dev.server import HOST, EmbeddedServerError, wait_until


class SentinelServer(RedisServer):
    """One Sentinel watching ``master_name`` at ``primary_port``. Small timeouts suit a
    test (a failover in a few seconds); production keeps Redis' defaults or close."""

    kind = "sentinel"

    def __init__(
        self,
        data_dir: Path,
        primary_port: int,
        master_name: str,
        *,
        port: int | None = None,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        auth_pass: str | None = None,
        binary: Path | None = None,
    ) -> None:
        super().__init__(data_dir, port, appendonly=False, binary=binary)
        self.auth_pass = auth_pass
        self.primary_port = primary_port
        self.master_name = master_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "sentinel.conf"

    def _argv(self) -> list[str]:
        # Written once: a Sentinel rewrites its file with what it learnt (the current
        # primary, replicas, other Sentinels, epochs), which a restart must keep.
        if not self.config_path.exists():
            name = self.master_name
            self.config_path.write_text(
                f"port {self.port}\nbind {HOST}\ndir {self.data_dir}\n"
                f"sentinel monitor {name} {HOST} {self.primary_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
                + (f"sentinel auth-pass {name} {self.auth_pass}\n" if self.auth_pass else "")
            )
        return [
            str(self.binary),
            str(self.config_path),
            "--sentinel",
            *("--daemonize", "no", "--logfile", ""),
        ]


class SentinelTopology:
    """A primary, ``replicas`` replicas (AOF on, as in production) and ``sentinels``
    Sentinels (quorum: a majority) under ``base_dir``. ``url`` is the ``REDIS_URL``."""

    def __init__(
        self,
        base_dir: Path,
        *,
        master_name: str = "wbcache",
        replicas: int = 1,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        db: int = 0,
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``password``: the data nodes require it (``requirepass``, and ``masterauth``
        between them); the Sentinels know it (``auth-pass``) and ``url`` carries it."""
        self.base_dir = Path(base_dir)
        self.master_name = master_name
        self.db = db
        self.password = password
        self.nodes: list[RedisServer] = [
            RedisServer(self.base_dir / "redis-0", extra_args=extra_args)
        ]
        primary_port = self.nodes[0].port
        for i in range(replicas):
            self.nodes.append(
                RedisServer(
                    self.base_dir / f"redis-{i + 1}",
                    extra_args=[*extra_args, "--replicaof", HOST, str(primary_port)],
                )
            )
        quorum = sentinels // 2 + 1
        self.sentinels = [
            SentinelServer(
                self.base_dir / f"sentinel-{i}",
                primary_port,
                master_name,
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                auth_pass=password,
            )
            for i in range(sentinels)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        auth = f":{self.password}@" if self.password else ""
        return f"redis+sentinel://{auth}{hosts}/{self.master_name}/{self.db}"

    def start(self, timeout: float = 30) -> None:
        """Start everything; return once the replicas are in sync and every Sentinel knows
        the replicas and the other Sentinels (a failover needs both)."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start()
                if self.password:  # set after the start, which probes without a password
                    client = redis.Redis(host=HOST, port=node.port, socket_timeout=2)
                    try:
                        client.config_set("masterauth", self.password)
                        client.config_set("requirepass", self.password)
                    finally:
                        client.close()
            for s in self.sentinels:
                s.start()
            self._wait(self._ready, deadline, "the Sentinel topology to be ready")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in [*self.sentinels, *self.nodes]:
            server.stop()

    # -- state --------------------------------------------------------------------------

    def _ask(self, port: int, *command: Any) -> Any:
        """``command``'s answer from the server on ``port`` (a data node or a Sentinel)."""
        node = any(n.port == port for n in self.nodes)
        client = redis.Redis(
            host=HOST,
            port=port,
            password=self.password if node else None,
            socket_timeout=2,
            decode_responses=True,
        )
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def primary_port(self) -> int | None:
        """The port the Sentinels agree is the primary's (a majority of those answering)."""
        votes: dict[int, int] = {}
        for s in self.sentinels:
            if not s.running:
                continue
            try:
                addr = self._ask(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)
            except redis.RedisError:
                continue
            if addr:
                votes[int(addr[1])] = votes.get(int(addr[1]), 0) + 1
        best = max(votes.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best and best[1] > len(self.sentinels) // 2 else None

    def node(self, port: int) -> RedisServer:
        return next(n for n in self.nodes if n.port == port)

    @property
    def primary(self) -> RedisServer:
        port = self.primary_port()
        if port is None:
            raise EmbeddedServerError("the Sentinels agree on no primary")
        return self.node(port)

    def _role(self, node: RedisServer) -> dict[str, Any]:
        return cast(dict[str, Any], self._ask(node.port, "INFO", "replication"))

    def _ready(self) -> bool:
        port = self.primary_port()
        if port is None:
            return False
        primary = self.node(port)
        if self._role(primary)["role"] != "master":
            return False
        for node in self.nodes:
            if node is not primary and node.running:
                info = self._role(node)
                if info["role"] != "slave" or info.get("master_link_status") != "up":
                    return False
        replicas = sum(1 for n in self.nodes if n is not primary and n.running)
        for s in self.sentinels:
            state = self._ask(s.port, "SENTINEL", "MASTER", self.master_name)
            fields = dict(zip(state[::2], state[1::2], strict=True))
            if int(fields["num-slaves"]) < replicas:
                return False
            if int(fields["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
            if "s_down" in fields["flags"] or "o_down" in fields["flags"]:
                return False
        return True

    def wait_failover(self, old_port: int, timeout: float = 30) -> RedisServer:
        """Wait until the Sentinels name another primary than ``old_port`` and it runs as
        one; return it."""
        deadline = time.monotonic() + timeout

        def promoted() -> bool:
            port = self.primary_port()
            return (
                port is not None
                and port != old_port
                and self._role(self.node(port))["role"] == "master"
            )

        self._wait(promoted, deadline, f"a failover away from port {old_port}")
        return self.primary

    def _wait(self, predicate: Any, deadline: float, what: str) -> None:
        wait_until(predicate, deadline, what, [s.log_path for s in self.sentinels])
