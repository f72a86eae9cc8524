"""Purges as CloudFront invalidations: the surrogate keys a purge round names become paths
(``/v1/<collection>/<key>``, ``/v1/<collection>/*``), sent in one ``CreateInvalidation``
per round (up to 1,000 paths each), at most one call per
CLOUDFRONT_MIN_INTERVAL_SECONDS: what is written meanwhile waits in the purge queue,
where repeated writes to a key coalesce. boto3 is synchronous: each call runs in a
thread. CloudFront completes an invalidation in seconds to minutes (docs/edge.md)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from service.adapters.edge import EdgeError
from service.core import surrogate

# Paths per CreateInvalidation (CloudFront takes up to 3,000 in progress at once).
MAX_PATHS = 1000


class CloudFront:
    def __init__(
        self, distribution_id: str, endpoint_url: str, min_interval: float, timeout: float
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError:  # an optional extra: say how to get it
            raise RuntimeError(
                "CLOUDFRONT_DISTRIBUTION_ID needs boto3: pip install 'wbcache[cloudfront]'"
            ) from None
        self.client: Any = boto3.client(
            "cloudfront",
            endpoint_url=endpoint_url or None,
            config=Config(
                connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}
            ),
        )
        self.distribution_id = distribution_id
        self.url = f"cloudfront:{distribution_id}"
        self.min_interval = min_interval
        self._next_call = 0.0

    def ready_in(self) -> float:
        """The purger claims nothing for any edge until then, so that what is written
        meanwhile goes in the next call."""
        return max(0.0, self._next_call - time.monotonic())

    async def purge(self, keys: Sequence[str]) -> int:
        """Invalidate the paths of ``keys``; returns the calls made. Raises EdgeError when
        CloudFront refuses or does not answer (the round is retried with backoff)."""
        paths = sorted({surrogate.path(k) for k in keys})
        calls = 0
        for start in range(0, len(paths), MAX_PATHS):
            wait = self.ready_in()  # more than one call this round: the later ones wait
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_call = time.monotonic() + self.min_interval
            try:
                await asyncio.to_thread(self._invalidate, paths[start : start + MAX_PATHS])
            except Exception as exc:  # botocore's errors: refused, throttled, unreachable
                raise EdgeError(f"{self.url}: {type(exc).__name__}: {exc}") from exc
            calls += 1
        return calls

    def _invalidate(self, paths: list[str]) -> None:
        self.client.create_invalidation(
            DistributionId=self.distribution_id,
            InvalidationBatch={
                "Paths": {"Quantity": len(paths), "Items": paths},
                "CallerReference": f"wbcache-{uuid.uuid4().hex}",
            },
        )
