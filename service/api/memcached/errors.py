"""What a failed command answers, decided in one place for the text and meta commands:
memcached's ``SERVER_ERROR <why>`` for anything the server cannot do now (Redis or
Postgres down, MAX_PENDING reached, an item too large); the connection stays open."""

from __future__ import annotations

import logging

from service.api.memcached.ops import Backpressure, NotPersisted
from service.api.memcached.parser import client_error, server_error
from service.api.memcached.values import TooLarge
from service.core.errors import classify

log = logging.getLogger("wbcache.memcached")


class BadCommand(ValueError):
    """A command line that does not conform to the protocol: ``CLIENT_ERROR <why>``."""


def error_reply(exc: Exception) -> bytes:
    if isinstance(exc, BadCommand):
        return client_error(str(exc))
    if isinstance(exc, Backpressure):
        return server_error(
            "out of memory storing object: too many writes are waiting to be persisted "
            "(MAX_PENDING); retry shortly"
        )
    if isinstance(exc, NotPersisted):
        if exc.dead:
            return server_error(
                f"rejected by the database: the write (version {exc.version}) is in the "
                "dead letters, with the error"
            )
        return server_error(
            f"not persisted: the write (version {exc.version}) is stored and queued, but "
            f"Postgres did not commit it within {exc.timeout:g} s"
        )
    if isinstance(exc, TooLarge):
        return server_error("object too large for cache")
    unavailable = classify(exc)
    if unavailable is not None:
        return server_error(f"{unavailable.dependency} unavailable, retry: {unavailable.detail}")
    log.exception("memcached command failed", exc_info=exc)
    return server_error(f"internal error: {type(exc).__name__}")
