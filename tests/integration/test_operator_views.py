"""Operator views: attempts of a dead letter across retries, pending per collection."""

from __future__ import annotations

import asyncpg
import httpx
from arq.worker import Worker

from service.config import Settings
from tests.conftest import running_worker, wait_drained
from tests.integration.test_dead_letters import poison_constraint, settled


async def test_attempts_count_operator_retries(
    api: httpx.AsyncClient, settings: Settings, pg: asyncpg.Connection
) -> None:
    async with poison_constraint(pg):
        await api.put("/v1/att/k", json={"poison": 1})
        async with running_worker(settings):
            await settled(api, dead=1)
            first = (await api.get("/v1/dead-letters")).json()["items"][0]
            assert first["attempts"] == 1
            # Retrying while the cause is still there dead-letters it again, counted.
            assert (await api.post("/v1/dead-letters:retry")).json() == {"retried": 1}
            await settled(api, dead=1)
            again = (await api.get("/v1/dead-letters")).json()["items"][0]
            assert again["attempts"] == 2
            assert again["version"] == first["version"]
            # A new write supersedes the dead letter and starts the count afresh.
            await api.put("/v1/att/k", json={"poison": 2})
            await settled(api, dead=1)
            fresh = (await api.get("/v1/dead-letters")).json()["items"][0]
            assert fresh["attempts"] == 1 and fresh["version"] > first["version"]


async def test_pending_per_collection(api: httpx.AsyncClient, settings: Settings) -> None:
    for i in range(5):
        await api.put(f"/v1/alpha/k{i}", json=i)
    for i in range(3):
        await api.put(f"/v1/beta/k{i}", json=i)
    await api.put("/v1/alpha/k0", json="again")  # ten writes to one key count once
    s = (await api.get("/v1/stats")).json()
    assert s["pending"] == 8
    assert s["pending_by_collection"] == {"alpha": 5, "beta": 3}
    assert s["pending_by_collection_exact"] is True


async def test_pending_per_collection_empties_when_drained(
    api: httpx.AsyncClient, worker: Worker
) -> None:
    await api.put("/v1/gamma/k", json=1)
    await wait_drained(api)
    s = (await api.get("/v1/stats")).json()
    assert s["pending_by_collection"] == {}
