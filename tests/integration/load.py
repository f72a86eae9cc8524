"""A load generator and a consistency checker, shared by the concurrency and chaos tests.

``Load`` runs N concurrent HTTP clients (one ``httpx.AsyncClient`` each) against one or
more API processes, issuing a random mix of PUT / PATCH (merge patch) / DELETE over K keys.
It records, per key, every acknowledged (2xx) write with its version and the document it
produced (PUT: the body sent; PATCH: the merged document the API answered; DELETE: gone).
Answers that do not say whether the write happened (503, connection errors, timeouts) are
not acknowledged: they are recorded as writes of unknown outcome and retried a few times.
A 503 must carry Retry-After; ``refusals`` counts the 503s by their error code.

``Load.check`` then waits for ``pending == 0`` (bounded; ``dead_letters`` must be 0) and
verifies, for every key, that Postgres holds exactly the acknowledged write with the highest
version (jsonb-compared; a delete: no row), that no row's version is above it, and that every
API process answers GET with that same document under ``ETag: "<version>"`` (404 when
deleted). A write of unknown outcome may legitimately be the final state of its key only if
it could have been ordered after the highest acknowledged write (it had not finished when
that one started) and the final row is what it would have written.

It also checks, as the load runs:

* read-your-writes: on a sample of acknowledged writes, a GET from another API process
  (the same one if there is only one) answers that version or a newer one;
* versions follow real time: of two acknowledged writes to a key, the one that finished
  before the other started has the lower version.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx

OPS = ("put", "patch", "delete")
JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True, slots=True)
class Write:
    """One write request. ``version`` is None when its outcome is unknown (not acknowledged).

    ``doc`` is the document the write leaves: PUT the body sent, PATCH the merged document
    answered (None when unknown), DELETE None."""

    op: str
    key: str
    version: int | None
    doc: Any
    started: float
    ended: float
    client: int

    @property
    def acked(self) -> bool:
        return self.version is not None


@dataclass
class KeyHistory:
    acks: list[Write] = field(default_factory=list)
    unknown: list[Write] = field(default_factory=list)

    def latest(self) -> Write | None:
        return max(self.acks, key=lambda w: w.version or 0, default=None)


@dataclass
class CheckReport:
    keys: int = 0
    live: int = 0
    deleted: int = 0
    never_written: int = 0
    settled_by_unknown: int = 0
    acked: int = 0
    unknown: int = 0
    gets: int = 0
    ryw_samples: int = 0
    drain_seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"keys={self.keys} live={self.live} deleted={self.deleted} "
            f"never_written={self.never_written} settled_by_unknown={self.settled_by_unknown} "
            f"acked={self.acked} unknown={self.unknown} gets={self.gets} "
            f"ryw_samples={self.ryw_samples} drain={self.drain_seconds:.1f}s "
            f"problems={len(self.problems)}"
        )

    def assert_ok(self) -> None:
        shown = "\n  ".join(self.problems[:30])
        assert not self.problems, f"{self.summary()}\n  {shown}"


def key_names(n: int) -> list[str]:
    """Mostly plain keys, plus some that need care in URLs and in Redis/Postgres."""
    names: list[str] = []
    for i in range(n):
        if i % 10 == 3:
            names.append(f"dir/k{i}")  # %2F in the URL: part of the key
        elif i % 10 == 7:
            names.append(f"ключ {i} ü")  # non-ASCII and a space
        else:
            names.append(f"k{i:05d}")
    return names


def etag_version(response: httpx.Response) -> int | None:
    tag = response.headers.get("etag")
    if tag is None or len(tag) < 3 or not (tag.startswith('"') and tag.endswith('"')):
        return None
    try:
        return int(tag[1:-1])
    except ValueError:
        return None


def _error_code(response: httpx.Response) -> str:
    """The ``error.code`` of an error answer's JSON body, or what stands in for it."""
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"no error code: {response.text[:80]!r}"


def _doc(rng: random.Random, client: int, seq: int) -> Any:
    """A random document; mostly objects, with the JSON that trips naive code paths."""
    kind = rng.random()
    if kind < 0.05:
        return [seq, client, [], {}, "x" * rng.randint(0, 40)]
    if kind < 0.08:
        return f"plain string {client}/{seq} ✓"
    return {
        "client": client,
        "seq": seq,
        "n": rng.randint(-(2**53), 2**53),
        "f": rng.choice([0.5, -3.25, 1e-7, 12345.678, 2.0]),
        "s": rng.choice(["", "ascii", "ünïcødé 😀", 'quote " and \\ backslash']),
        "empty_list": [],
        "empty_obj": {},
        "flag": rng.choice([True, False, None]),
        "tags": [rng.randint(0, 9) for _ in range(rng.randint(0, 4))],
        "nested": {"a": {"b": [1, {"c": seq}]}, "d": rng.random() < 0.5},
    }


def _patch(rng: random.Random, client: int, seq: int) -> Any:
    patch: dict[str, Any] = {"seq": seq, f"p{client}": rng.randint(0, 10**9)}
    if rng.random() < 0.3:
        patch["flag"] = None  # RFC 7396: remove the member
    if rng.random() < 0.3:
        patch["nested"] = {"a": {"z": []}, "d": None}
    if rng.random() < 0.2:
        patch["tags"] = [seq, {}]
    return patch


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class Load:
    def __init__(
        self,
        base_urls: Sequence[str],
        collection: str,
        *,
        keys: int = 300,
        clients: int = 32,
        seed: int = 1,
        weights: tuple[float, float, float] = (0.5, 0.3, 0.2),
        ryw_fraction: float = 0.0,
        retries: int = 3,
        retry_delay: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        assert base_urls
        self.base_urls = list(base_urls)
        self.collection = collection
        self.keys = key_names(keys)
        self.clients = clients
        self.seed = seed
        self.weights = weights
        self.ryw_fraction = ryw_fraction
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self.history: dict[str, KeyHistory] = {k: KeyHistory() for k in self.keys}
        self.counts: Counter[str] = Counter()
        # The error codes of the 503s (redis_unavailable, replicas_unconfirmed, ...).
        self.refusals: Counter[str] = Counter()
        self.problems: list[str] = []
        self.ryw_samples = 0
        self._ryw_404: list[tuple[str, int, float]] = []  # key, acked version, GET end
        self._issued = 0
        self._started_at = 0.0
        self.elapsed = 0.0

    # -- bookkeeping ---------------------------------------------------------------------

    @property
    def acked(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("ack "))

    @property
    def unknown(self) -> int:
        return sum(v for k, v in self.counts.items() if k.startswith("unknown "))

    def url(self, base: str, key: str) -> str:
        return f"{base}/v1/{self.collection}/{quote(key, safe='')}"

    def _problem(self, text: str) -> None:
        if len(self.problems) < 1000:
            self.problems.append(text)

    async def wait_acked(self, n: int, timeout: float = 60.0) -> None:
        """Wait until at least ``n`` writes in total have been acknowledged."""
        deadline = time.monotonic() + timeout
        while self.acked < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.acked} of {n} writes acknowledged in {timeout}s")
            await asyncio.sleep(0.05)

    async def wait_unknown(self, n: int, timeout: float = 30.0) -> None:
        """Wait until at least ``n`` writes have had no acknowledgement (503, errors)."""
        deadline = time.monotonic() + timeout
        while self.unknown < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {self.unknown} of {n} unacknowledged writes seen")
            await asyncio.sleep(0.05)

    # -- requests ------------------------------------------------------------------------

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=5.0),
            # Below uvicorn's 5 s keep-alive timeout: reusing a connection the server is
            # closing at that moment fails with RemoteProtocolError, an HTTP race that
            # says nothing about the service.
            limits=httpx.Limits(
                max_connections=4, max_keepalive_connections=4, keepalive_expiry=2.0
            ),
        )

    async def _send(
        self, http: httpx.AsyncClient, client: int, base: str, op: str, key: str, body: Any
    ) -> tuple[str, Write | None]:
        """One attempt. Returns ("ack", write), ("no", None) for a definite no-op (404), or
        ("unknown", None)."""
        url = self.url(base, key)
        started = time.monotonic()
        try:
            if op == "put":
                r = await http.put(url, content=_dumps(body), headers={"content-type": JSON})
            elif op == "patch":
                r = await http.patch(
                    url, content=_dumps(body), headers={"content-type": MERGE_PATCH}
                )
            else:
                r = await http.delete(url)
        except httpx.TransportError as exc:
            # The request may still be running in the API (or not even have arrived): it
            # could take effect at any time, so it is ordered after nothing.
            ended = float("inf")
            self.counts[f"unknown {op} {type(exc).__name__}"] += 1
            self.history[key].unknown.append(
                Write(op, key, None, body if op == "put" else None, started, ended, client)
            )
            return "unknown", None
        ended = time.monotonic()
        status = r.status_code
        if 200 <= status < 300:
            version = etag_version(r)
            if version is None or version <= 0:
                self._problem(f"{op} {key!r} answered {status} without a valid ETag: {r.headers}")
                return "no", None
            expected_status: tuple[int, ...]
            if op == "put":
                expected_status = (200, 201)
                doc: Any = body
                answer = r.json()
                if answer != {"collection": self.collection, "key": key, "version": version}:
                    self._problem(f"PUT {key!r} answer {answer} does not match ETag {version}")
            elif op == "patch":
                expected_status = (200,)
                doc = r.json()
            else:
                expected_status = (204,)
                doc = None
            if status not in expected_status:
                self._problem(f"{op} {key!r} answered {status}")
            w = Write(op, key, version, doc, started, ended, client)
            self.history[key].acks.append(w)
            self.counts[f"ack {op}"] += 1
            return "ack", w
        if status == 404 and op in ("patch", "delete"):
            self.counts[f"404 {op}"] += 1
            return "no", None
        if status == 503:
            self.counts[f"unknown {op} 503"] += 1
            self.refusals[_error_code(r)] += 1
            if not r.headers.get("retry-after", "").isdigit():
                self._problem(f"{op} {key!r} answered 503 without Retry-After: {r.text[:300]}")
            self.history[key].unknown.append(
                Write(op, key, None, body if op == "put" else None, started, ended, client)
            )
            return "unknown", None
        self.counts[f"unexpected {op} {status}"] += 1
        self._problem(f"{op} {key!r} answered {status}: {r.text[:300]}")
        return "no", None

    async def _read_your_write(self, http: httpx.AsyncClient, base: str, w: Write) -> None:
        try:
            r = await http.get(self.url(base, w.key))
        except httpx.TransportError as exc:
            self.counts[f"ryw error {type(exc).__name__}"] += 1
            return
        ended = time.monotonic()
        assert w.version is not None
        self.ryw_samples += 1
        if r.status_code == 200:
            seen = etag_version(r)
            if seen is None or seen < w.version:
                self._problem(
                    f"read-your-writes: {w.op} {w.key!r} acked version {w.version}, "
                    f"then GET from {base} answered version {seen}"
                )
            elif seen == w.version and (w.op == "delete" or r.json() != w.doc):
                self._problem(
                    f"read-your-writes: {w.key!r} version {w.version} ({w.op}) read back as "
                    f"{r.text[:200]}"
                )
        elif r.status_code == 404:
            if w.op != "delete":
                self._ryw_404.append((w.key, w.version, ended))
        elif r.status_code == 503:
            self.counts["ryw 503"] += 1
        else:
            self._problem(f"read-your-writes GET {w.key!r} answered {r.status_code}")

    async def _one(
        self, http: httpx.AsyncClient, rng: random.Random, client: int, seq: int
    ) -> None:
        key = rng.choice(self.keys)
        op = rng.choices(OPS, self.weights)[0]
        body: Any = None
        if op == "put":
            body = _doc(rng, client, seq)
        elif op == "patch":
            body = _patch(rng, client, seq)
        home = self.base_urls[client % len(self.base_urls)]
        other = self.base_urls[(client + 1) % len(self.base_urls)]
        for attempt in range(self.retries + 1):
            outcome, w = await self._send(http, client, home, op, key, body)
            if outcome == "unknown":
                await asyncio.sleep(self.retry_delay * (attempt + 1))
                continue
            if w is not None and self.ryw_fraction and rng.random() < self.ryw_fraction:
                await self._read_your_write(http, other, w)
            return

    def _next_ticket(self, total: int | None, stop: asyncio.Event | None, deadline: float) -> int:
        if total is not None and self._issued >= total:
            return -1
        if stop is not None and stop.is_set():
            return -1
        if time.monotonic() > deadline:
            return -1
        self._issued += 1
        return self._issued

    async def _client_loop(
        self, client: int, total: int | None, stop: asyncio.Event | None, deadline: float
    ) -> None:
        rng = random.Random(self.seed * 100_003 + client)
        async with self._client() as http:
            while (seq := self._next_ticket(total, stop, deadline)) >= 0:
                await self._one(http, rng, client, seq)

    async def run(
        self,
        total: int | None = None,
        stop: asyncio.Event | None = None,
        max_seconds: float = 300.0,
    ) -> None:
        """Issue writes until ``total`` were issued, ``stop`` is set, or ``max_seconds``."""
        assert total is not None or stop is not None
        self._started_at = time.monotonic()
        deadline = self._started_at + max_seconds
        await asyncio.gather(
            *(self._client_loop(c, total, stop, deadline) for c in range(self.clients))
        )
        self.elapsed = time.monotonic() - self._started_at

    async def warm(self, timeout: float = 60.0) -> None:
        """PUT every key once (acknowledged), so every key is cached and live."""
        deadline = time.monotonic() + timeout
        sem = asyncio.Semaphore(16)

        async def put(http: httpx.AsyncClient, i: int, key: str) -> None:
            rng = random.Random(self.seed * 7 + i)
            body = _doc(rng, -1, i)
            async with sem:
                while True:
                    outcome, _ = await self._send(http, -1, self.base_urls[0], "put", key, body)
                    if outcome == "ack":
                        return
                    if time.monotonic() > deadline:
                        raise AssertionError(f"warm-up PUT of {key!r} not acknowledged")
                    await asyncio.sleep(0.1)

        async with self._client() as http:
            await asyncio.gather(*(put(http, i, k) for i, k in enumerate(self.keys)))

    # -- checking ------------------------------------------------------------------------

    async def wait_drained(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /v1/stats until ``pending == 0`` (errors tolerated until the deadline)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        async with self._client() as http:
            while True:
                try:
                    r = await http.get(f"{self.base_urls[0]}/v1/stats")
                    last = r.json() if r.status_code == 200 else f"{r.status_code} {r.text}"
                    if isinstance(last, dict) and last["pending"] == 0:
                        return last
                except (httpx.TransportError, ValueError) as exc:
                    last = repr(exc)
                if time.monotonic() > deadline:
                    raise AssertionError(f"pending did not reach 0 within {timeout}s: {last}")
                await asyncio.sleep(0.1)

    def _check_version_order(self, report: CheckReport) -> None:
        for key, h in self.history.items():
            acks = sorted(h.acks, key=lambda w: w.started)
            for i, b in enumerate(acks):
                assert b.version is not None
                for a in acks[:i]:
                    assert a.version is not None
                    if a.ended < b.started and a.version >= b.version:
                        report.problems.append(
                            f"{key!r}: {a.op} v{a.version} finished before {b.op} "
                            f"v{b.version} started, yet its version is not lower"
                        )
                seen = [a.version for a in acks[:i]]
                if b.version in seen:
                    report.problems.append(f"{key!r}: version {b.version} acknowledged twice")

    def _check_ryw_404s(self, report: CheckReport) -> None:
        for key, version, get_ended in self._ryw_404:
            h = self.history[key]
            newer_delete = any(
                w.op == "delete" and (w.version or 0) > version and w.started < get_ended
                for w in h.acks
            ) or any(w.op == "delete" and w.started < get_ended for w in h.unknown)
            if not newer_delete:
                report.problems.append(
                    f"read-your-writes: {key!r} acked at version {version}, then a GET answered "
                    "404 though no newer delete was acknowledged"
                )

    async def check(
        self,
        database_url: str,
        *,
        drain_timeout: float = 60.0,
        require_no_unknown: bool = False,
    ) -> CheckReport:
        report = CheckReport(keys=len(self.keys), ryw_samples=self.ryw_samples)
        report.problems.extend(self.problems)
        report.acked = self.acked
        report.unknown = self.unknown
        if require_no_unknown and self.unknown:
            report.problems.append(f"unacknowledged writes in a run without faults: {self.counts}")
        self._check_version_order(report)
        self._check_ryw_404s(report)

        started = time.monotonic()
        stats = await self.wait_drained(drain_timeout)
        report.drain_seconds = time.monotonic() - started
        report.stats = stats
        if stats["dead_letters"] != 0:
            report.problems.append(f"dead letters: {stats['dead_letters']} ({stats})")

        conn = await asyncpg.connect(database_url)
        try:
            rows = {
                r["key"]: (r["version"], r["value"])
                for r in await conn.fetch(
                    "SELECT key, version, value::text AS value FROM records WHERE collection = $1",
                    self.collection,
                )
            }
            # Every candidate final document, jsonb-compared with the row in Postgres.
            cand_keys: list[str] = []
            cand_docs: list[str] = []
            for key, h in self.history.items():
                for w in [*h.acks, *h.unknown]:
                    if w.op != "delete" and w.doc is not None:
                        cand_keys.append(key)
                        cand_docs.append(_dumps(w.doc).decode())
            equal: set[tuple[str, int]] = set()
            for r in await conn.fetch(
                """
                SELECT e.i, e.key FROM unnest($2::text[], $3::text[]) WITH ORDINALITY
                    AS e(key, doc, i)
                JOIN records r ON r.collection = $1 AND r.key = e.key
                WHERE r.value = e.doc::jsonb
                """,
                self.collection,
                cand_keys,
                cand_docs,
            ):
                equal.add((r["key"], int(r["i"]) - 1))
        finally:
            await conn.close()

        doc_index: dict[int, int] = {}  # id(write) -> index in the candidate arrays
        i = 0
        for _key, h in self.history.items():
            for w in [*h.acks, *h.unknown]:
                if w.op != "delete" and w.doc is not None:
                    doc_index[id(w)] = i
                    i += 1

        for stray in sorted(set(rows) - set(self.history)):
            report.problems.append(f"Postgres holds a row for a key never written: {stray!r}")

        for key, h in self.history.items():
            latest = h.latest()
            row = rows.get(key)
            # Unknown writes that may have been ordered after the latest acknowledged one.
            late = [u for u in h.unknown if latest is None or u.ended > latest.started]
            if latest is None:
                report.never_written += 1
            elif latest.op == "delete":
                report.deleted += 1
            else:
                report.live += 1
            if latest is not None and latest.op != "delete":
                assert latest.version is not None
                if row is not None and row[0] == latest.version:
                    if (key, doc_index[id(latest)]) not in equal:
                        report.problems.append(
                            f"{key!r}: Postgres holds version {row[0]} with {row[1][:200]}, "
                            f"but that write's document is {_dumps(latest.doc)[:200]!r}"
                        )
                    continue
            elif row is None:
                continue  # deleted (or never written), and no row: as acknowledged
            # The row is not the latest acknowledged state: only a late unknown write may
            # explain it.
            floor = latest.version if latest is not None and latest.version else 0
            explained = False
            if row is None:
                explained = any(u.op == "delete" for u in late)
            elif row[0] > floor:
                explained = any(
                    u.op == "patch" or (u.op == "put" and (key, doc_index[id(u)]) in equal)
                    for u in late
                )
            if explained:
                report.settled_by_unknown += 1
                continue
            want = (
                "nothing (never written)"
                if latest is None
                else f"{latest.op} version {latest.version}"
            )
            got = "no row" if row is None else f"row version {row[0]}"
            report.problems.append(
                f"{key!r}: last acknowledged write is {want}, Postgres holds {got} "
                f"(unknown-outcome writes: {[(u.op, u.started) for u in h.unknown]})"
            )

        await self._check_gets(rows, report)
        return report

    async def _check_gets(self, rows: dict[str, tuple[int, str]], report: CheckReport) -> None:
        """Every API process answers GET with what Postgres holds, byte-identical."""
        sem = asyncio.Semaphore(16)

        async def get(http: httpx.AsyncClient, key: str) -> None:
            row = rows.get(key)
            bodies: set[bytes] = set()
            for base in self.base_urls:
                async with sem:
                    r = await http.get(self.url(base, key))
                report.gets += 1
                if row is None:
                    if r.status_code != 404:
                        report.problems.append(
                            f"GET {key!r} from {base}: {r.status_code} {r.text[:200]}, "
                            "but Postgres has no row"
                        )
                    continue
                if r.status_code != 200:
                    report.problems.append(
                        f"GET {key!r} from {base}: {r.status_code}, Postgres has version {row[0]}"
                    )
                    continue
                if etag_version(r) != row[0]:
                    report.problems.append(
                        f"GET {key!r} from {base}: ETag {r.headers.get('etag')}, "
                        f"Postgres has version {row[0]}"
                    )
                if r.json() != json.loads(row[1]):
                    report.problems.append(
                        f"GET {key!r} from {base}: {r.text[:200]} != Postgres {row[1][:200]}"
                    )
                bodies.add(r.content)
            if len(bodies) > 1:
                report.problems.append(f"GET {key!r}: API processes answer different bytes")

        async with self._client() as http:
            await asyncio.gather(*(get(http, k) for k in self.keys))


@dataclass
class FailoverAccount:
    """What a Redis failover did to the acknowledged writes that the promoted replica does
    not hold (``gone``): ``lost`` (neither it nor Postgres has them), ``stale`` (a worker
    had persisted the newest of them before the kill: Postgres holds it, the cache an older
    state until invalidated), ``maybe_stale`` (keys where a write of unknown outcome sent
    before the kill reached Postgres above what the replica held)."""

    lost: list[Write]
    stale: set[str]
    maybe_stale: set[str]


def take_gone(load: Load, held: dict[str, int], killed_at: float) -> dict[str, list[Write]]:
    """Take out of ``load.history`` the acknowledged writes the old primary answered before
    it died with a version above what the promoted replica holds for their key (``held``;
    keys it does not list are not checked): gone from Redis with the old primary."""
    gone: dict[str, list[Write]] = {}
    for key, history in load.history.items():
        kept = []
        for w in history.acks:
            assert w.version is not None
            if key in held and w.started < killed_at and w.version > held[key]:
                gone.setdefault(key, []).append(w)
            else:
                kept.append(w)
        history.acks = kept
    return gone


async def account_failover(
    load: Load,
    pg: asyncpg.Connection,
    gone: dict[str, list[Write]],
    held: dict[str, int],
    killed_at: float,
) -> FailoverAccount:
    """Drain, then sort the ``gone`` writes (per key, acknowledged before the kill with a
    version above ``held``, the promoted replica's) into lost and persisted; a persisted
    one, and every older one of its key, counts as acknowledged in ``load.history``."""
    await load.wait_drained(60)
    rows = {
        r["key"]: r["version"]
        for r in await pg.fetch(
            "SELECT key, version FROM records WHERE collection = $1", load.collection
        )
    }
    lost: list[Write] = []
    stale: set[str] = set()
    for key, ws in gone.items():
        # The newest gone write Postgres shows (a delete: no row; only the newest can).
        ws.sort(key=lambda w: w.version or 0)
        shown = next(
            (
                i
                for i in range(len(ws) - 1, -1, -1)
                if rows.get(key) == ws[i].version
                or (i == len(ws) - 1 and ws[i].op == "delete" and key not in rows)
            ),
            None,
        )
        if shown is None:
            lost.extend(ws)
        else:
            load.history[key].acks.extend(ws[: shown + 1])
            lost.extend(ws[shown + 1 :])
            stale.add(key)
    # A write of unknown outcome sent before the kill (a 503 replicas_unconfirmed: the old
    # primary applied it, no replica confirmed it) may have been persisted by a worker and
    # be gone from the promoted replica all the same: its key may be stale in the cache too.
    maybe_stale = {
        key
        for key, h in load.history.items()
        if key in held
        and any(w.started < killed_at for w in h.unknown)
        and rows.get(key, 0) > held[key]
    }
    return FailoverAccount(lost, stale, maybe_stale)


async def check_after_failover(
    load: Load, database_url: str, account: FailoverAccount
) -> CheckReport:
    """``load.check``, less the stale reads the account expects (keys whose cache holds an
    older state than Postgres until invalidated)."""
    report = await load.check(database_url, drain_timeout=60)
    keys = account.stale | account.maybe_stale
    expected = [p for p in report.problems if p.startswith(tuple(f"GET {k!r} " for k in keys))]
    report.problems = [p for p in report.problems if p not in expected]
    return report
