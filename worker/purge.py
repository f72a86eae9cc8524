"""The purger: each worker drains the edge purge queue (service/core/purge.py) while
EDGE_PURGE_URLS names edges (or CLOUDFRONT_DISTRIBUTION_ID a distribution). Claims are
leased, so any number of workers share the queue, and a purger that dies mid-purge only
delays its claim by the lease.

A purge is done when every edge confirmed it; otherwise it is due again after a backoff
that doubles with each failed round (up to EDGE_PURGE_BACKOFF_MAX_SECONDS), for as long
as the edge stays down: a purge is never dropped."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from service.adapters.cloudfront import CloudFront
from service.adapters.edge import Edge, EdgeError
from service.adapters.redis import AnyRedis
from service.config import Settings
from service.core import surrogate
from service.core.errors import classify
from service.core.purge import ECHO, Claim, PurgeQueue
from service.core.scripts import Scripts
from service.core.shards import Shards

log = logging.getLogger("wbcache.purge")

# How often an idle purger looks at the queue: a write's purge waits at most this long
# before it is sent (the 1 s bound of docs/edge.md includes it).
POLL_SECONDS = 0.02
# Purges per shard per round.
CLAIM_LIMIT = 500
# Retried purges remembered for their latency (when each was first queued), at most.
SINCE_LIMIT = 100_000


class Purges(Protocol):
    """An edge: a Varnish (service/adapters/edge.py) or CloudFront (cloudfront.py)."""

    url: str

    def ready_in(self) -> float:
        """Seconds before it takes another purge (a rate limit), 0 if now."""
        ...

    async def purge(self, keys: Sequence[str]) -> int: ...


class Purger:
    def __init__(self, redis: AnyRedis, settings: Settings) -> None:
        self.queue = PurgeQueue(redis, Shards.from_settings(settings), Scripts.register(redis))
        timeout = settings.edge_purge_timeout_seconds
        self.edges: list[Purges] = [Edge(url, timeout) for url in settings.edge_urls]
        if settings.cloudfront_distribution_id:
            self.edges.append(
                CloudFront(
                    settings.cloudfront_distribution_id,
                    settings.cloudfront_endpoint_url,
                    settings.cloudfront_min_interval_seconds,
                    timeout,
                )
            )
        self.settings = settings
        # A claim outlives a round of requests to every edge, each at most the timeout.
        self.lease_ms = int(timeout * 2 * 1000 + 1000)
        self.failed_rounds = 0
        self.since: dict[str, int] = {}

    def backoff_ms(self) -> int:
        cap = self.settings.edge_purge_backoff_max_seconds
        return int(min(cap, 0.1 * 2 ** min(self.failed_rounds, 16)) * 1000)

    async def round(self) -> int:
        """Claim what is due and send it; returns how many purges were settled."""
        settled = 0
        # Claimed only once every edge can take them: what is written while one waits for
        # its turn (CloudFront's rate limit) joins the same round.
        wait = max((edge.ready_in() for edge in self.edges), default=0.0)
        if wait > 0:
            await asyncio.sleep(wait)
        for claim in await self.queue.claim(self.lease_ms, CLAIM_LIMIT):
            await self._send(claim)
            settled += len(claim.items)
        return settled

    async def _send(self, claim: Claim) -> None:
        keys = sorted({surrogate.of_queued(m.removeprefix(ECHO)) for m in claim.members})
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(edge.purge(keys) for edge in self.edges), return_exceptions=True
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for failure in failures:
            if not isinstance(failure, EdgeError):
                raise failure
        if failures:
            self.failed_rounds += 1
            if self.failed_rounds == 1 or self.failed_rounds % 20 == 0:
                log.warning(
                    "edge purge failed (%d keys; retrying with backoff): %s",
                    len(keys),
                    "; ".join(str(f) for f in failures),
                )
            if len(self.since) < SINCE_LIMIT:
                for m, due in claim.items:
                    self.since.setdefault(m, due)
            await self.queue.retry(claim, self.backoff_ms())
            return
        if self.failed_rounds:
            log.info("edge purges delivered again after %d failed rounds", self.failed_rounds)
        self.failed_rounds = 0
        since = {m: self.since.pop(m) for m in claim.members if m in self.since}
        await self.queue.done(
            claim, self.settings.edge_purge_echo_ms, time.monotonic() - started, since
        )

    async def run(self) -> None:
        """Until cancelled."""
        log.info("purging edges %s", ", ".join(e.url for e in self.edges))
        delay = POLL_SECONDS
        while True:
            try:
                settled = await self.round()
                delay = POLL_SECONDS
                if settled:
                    continue  # more may be due
            except Exception as exc:
                if classify(exc) is None:
                    log.exception("the purger failed; trying again")
                else:
                    log.warning("Redis unavailable to the purger (%s); trying again", exc)
                delay = min(5.0, max(0.5, delay * 2))
            await asyncio.sleep(delay)
