"""The CloudFront purger against moto's server, a local stand-in of the AWS API (it records
invalidations; it caches nothing, so what is checked is the calls: their paths, their
batching, their pace, and retries while CloudFront refuses)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import boto3
import pytest
from moto import server as moto_server

from service.config import Settings
from service.core.purge import collection_member, record_member
from tests.conftest import running_api, wait_until
from worker.purge import Purger

_DISTRIBUTION = {
    "CallerReference": "wbcache-test",
    "Comment": "",
    "Enabled": True,
    "Origins": {
        "Quantity": 1,
        "Items": [
            {
                "Id": "api",
                "DomainName": "api.example.com",
                "CustomOriginConfig": {
                    "HTTPPort": 80,
                    "HTTPSPort": 443,
                    "OriginProtocolPolicy": "https-only",
                },
            }
        ],
    },
    "DefaultCacheBehavior": {
        "TargetOriginId": "api",
        "ViewerProtocolPolicy": "redirect-to-https",
        "MinTTL": 0,
        "ForwardedValues": {"QueryString": False, "Cookies": {"Forward": "none"}},
        "TrustedSigners": {"Enabled": False, "Quantity": 0},
    },
}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's server on a free port (real HTTP), with throwaway credentials."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
    ):
        monkeypatch.setenv(name, value)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def client(aws: str) -> Any:
    return boto3.client("cloudfront", endpoint_url=aws)


@contextlib.asynccontextmanager
async def purging(settings: Settings, redis: Any) -> AsyncIterator[Purger]:
    purger = Purger(redis, settings)
    task = asyncio.create_task(purger.run())
    try:
        yield purger
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def invalidated(client: Any, distribution: str) -> list[list[str]]:
    """The paths of each invalidation (in no particular order), each sorted."""
    listing = client.list_invalidations(DistributionId=distribution)["InvalidationList"]
    out = []
    for item in listing.get("Items", []):
        got = client.get_invalidation(DistributionId=distribution, Id=item["Id"])
        out.append(sorted(got["Invalidation"]["InvalidationBatch"]["Paths"]["Items"]))
    return out


async def test_writes_and_invalidations_become_batched_rate_limited_invalidations(
    settings_factory: Callable[..., Settings], redis: Any, pg: Any, aws: str, client: Any
) -> None:
    distribution = client.create_distribution(DistributionConfig=_DISTRIBUTION)["Distribution"]
    settings = settings_factory(
        collection_cache={"pub": {"public": True, "s_maxage": 5}},
        cloudfront_distribution_id=distribution["Id"],
        cloudfront_endpoint_url=aws,
        cloudfront_min_interval_seconds=1.0,
        edge_purge_echo_ms=0,
    )
    async with running_api(settings) as api:
        # Queued by the write path and the invalidation, before anything drains them.
        assert (await api.put("/v1/pub/a", json=1)).status_code == 201
        assert (await api.put("/v1/pub/b%2Fc", json=2)).status_code == 201
        assert (await api.put("/v1/private/x", json=3)).status_code == 201  # not public
        r = await api.post("/v1/invalidate", json={"collection": "pub"})
        assert r.status_code == 200
        async with purging(settings, redis):
            await wait_until(lambda: len(invalidated(client, distribution["Id"])) == 1)
            first_seen = time.monotonic()
            # One call for the three purges, each a path of the API.
            assert invalidated(client, distribution["Id"]) == [
                ["/v1/pub/*", "/v1/pub/a", "/v1/pub/b%2Fc"]
            ]
            assert (await api.put("/v1/pub/a", json=4)).status_code == 200
            assert (await api.put("/v1/pub/d", json=5)).status_code == 201
            await wait_until(lambda: len(invalidated(client, distribution["Id"])) == 2)
            # The second call waited for its turn, and carried both writes' paths.
            assert time.monotonic() - first_seen >= 1.0 - 0.05
            assert sorted(invalidated(client, distribution["Id"])) == [
                ["/v1/pub/*", "/v1/pub/a", "/v1/pub/b%2Fc"],
                ["/v1/pub/a", "/v1/pub/d"],
            ]

            # The purger counts a purge once CloudFront answered the call that moto has
            # just shown: poll for the count, it may come a moment after.
            async def counted() -> bool:
                stats = (await api.get("/v1/stats")).json()
                assert stats["edge_purge_failures"] == 0, stats
                return bool(stats["edge_purges"] == 5 and stats["edge_purges_pending"] == 0)

            await wait_until(counted, timeout=10)


async def test_refused_invalidations_are_retried_and_counted(
    settings_factory: Callable[..., Settings], redis: Any, pg: Any, aws: str, client: Any
) -> None:
    settings = settings_factory(
        cloudfront_distribution_id="NO-SUCH-DISTRIBUTION",
        cloudfront_endpoint_url=aws,
        cloudfront_min_interval_seconds=0,
        edge_purge_backoff_max_seconds=0.2,
    )
    async with running_api(settings) as api, purging(settings, redis) as purger:
        await purger.queue.add([record_member("pub", "k"), collection_member("pub")])

        async def failing() -> bool:
            s = (await api.get("/v1/stats")).json()
            return bool(s["edge_purge_failures"] >= 3 and s["edge_purges_pending"] == 2)

        await wait_until(failing, timeout=10)
        assert (await api.get("/v1/stats")).json()["edge_purges"] == 0  # nothing dropped
