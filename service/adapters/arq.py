"""arq glue: the flush wake-up jobs, and arq's own Redis keys under REDIS_PREFIX.

arq jobs are wake-ups that carry no data: the dirty set in Redis is the queue. A lost
or failed job only delays a flush until the periodic sweep.

arq hard-codes its key prefixes (``arq:job:``, ``arq:in-progress:``, ``arq:retry:``,
``arq:result:``, ``arq:abort``) as module constants that it reads at call time. The contract
says REDIS_PREFIX covers every key the service owns, so deployments sharing a Redis never
meet: without this, two deployments' cron sweeps would share the job id
``cron:sweep:<second>`` and one would silently skip the other's. A process serves one
prefix, so setting the constants per process is enough.
"""

from __future__ import annotations

from datetime import timedelta

import arq.connections
import arq.constants
import arq.jobs
import arq.worker
from arq.connections import ArqRedis

from service.core.redis_keys import Keys

FLUSH_JOB = "flush"

_NAMES = (
    "job_key_prefix",
    "in_progress_key_prefix",
    "result_key_prefix",
    "retry_key_prefix",
    "abort_jobs_ss",
)
_ARQ_DEFAULTS = {name: getattr(arq.constants, name) for name in _NAMES}
_MODULES = (arq.constants, arq.connections, arq.jobs, arq.worker)


def use_prefix(prefix: str) -> None:
    for module in _MODULES:
        for name in _NAMES:
            if hasattr(module, name):
                setattr(module, name, prefix + _ARQ_DEFAULTS[name])


async def schedule_flush(redis: ArqRedis, keys: Keys, defer_ms: int) -> None:
    await redis.enqueue_job(
        FLUSH_JOB, _queue_name=keys.arq_queue, _defer_by=timedelta(milliseconds=defer_ms)
    )
