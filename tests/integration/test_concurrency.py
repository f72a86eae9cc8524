"""Many clients, two API processes, two workers: nothing acknowledged is lost or reordered,
every API process reads its own and the other's writes, and Postgres ends equal to the
cache."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import asyncpg

from tests.integration.load import Load
from tests.support.procs import ApiProc, WorkerProc
from tests.support.servers import TestServers as Servers


async def test_mixed_load_two_apis_two_workers(
    procs: Callable[..., ApiProc | WorkerProc],
    servers: Servers,
    pg: asyncpg.Connection,
) -> None:
    api1 = procs("api")
    api2 = procs("api")
    assert isinstance(api1, ApiProc) and isinstance(api2, ApiProc)
    workers = [procs("worker"), procs("worker")]

    load = Load(
        [api1.url, api2.url],
        f"conc-{uuid.uuid4().hex[:8]}",
        keys=300,
        clients=32,
        ryw_fraction=0.1,
        retries=0,
    )
    await load.run(total=10_000, max_seconds=400)
    assert load._issued == 10_000, f"only {load._issued} writes issued in {load.elapsed:.0f}s"
    report = await load.check(servers.database_url, drain_timeout=60, require_no_unknown=True)
    print(
        f"\n{load.elapsed:.1f}s for 10,000 writes ({10_000 / load.elapsed:.0f}/s): "
        f"{dict(load.counts)}\n{report.summary()}"
    )
    for w in workers:
        assert w.popen is not None and w.popen.poll() is None, w.output()[-3000:]
    report.assert_ok()
    # The mix really exercised every path: live, deleted, patched, read back elsewhere.
    assert report.live > 50 and report.deleted > 10, report.summary()
    assert load.counts["ack patch"] > 1000 and load.counts["ack delete"] > 500, load.counts
    assert report.ryw_samples > 500, report.summary()
