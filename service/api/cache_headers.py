"""The HTTP caching headers of record answers: ``Cache-Control`` by the collection's
policy (COLLECTION_CACHE), ``Surrogate-Key`` for edge purges, and ``Cache-Status`` (RFC
9211) beside the older ``X-Cache``. Each collection's text is made once."""

from __future__ import annotations

from service.config import CachePolicy, Settings

# RFC 9211: this cache's name, then what happened here. A proxy in front appends its own.
CACHE_STATUS_HIT = "wbcache; hit"
CACHE_STATUS_MISS = "wbcache; fwd=miss"
# What no cache may keep: errors, and 404s a shared cache must not hide a create behind.
NO_STORE = "no-store"


def cache_control(policy: CachePolicy) -> str:
    """The ``Cache-Control`` of a record (200 and 304) under ``policy``."""
    parts = ["public" if policy.public else "private", f"max-age={policy.max_age}"]
    if policy.public:
        if policy.s_maxage is not None:
            parts.append(f"s-maxage={policy.s_maxage}")
        if policy.stale_while_revalidate is not None:
            parts.append(f"stale-while-revalidate={policy.stale_while_revalidate}")
        if policy.stale_if_error is not None:
            parts.append(f"stale-if-error={policy.stale_if_error}")
    elif policy.max_age == 0:
        parts[1] = "no-cache"  # the same meaning, as CACHE_CONTROL_DEFAULT says it
    return ", ".join(parts)


def not_found_cache_control(policy: CachePolicy | None) -> str:
    """A 404's: stored only by shared caches, only if the collection allows it (its
    record's purge on create drops it); ``no-store`` otherwise."""
    if policy is None or not policy.public or not policy.not_found_s_maxage:
        return NO_STORE
    return f"public, max-age=0, s-maxage={policy.not_found_s_maxage}"


class CacheHeaders:
    def __init__(self, settings: Settings) -> None:
        self.default = settings.cache_control_default
        self.policies = settings.cache_policies
        self._found = {c: cache_control(p) for c, p in self.policies.items()}
        self._not_found = {c: not_found_cache_control(p) for c, p in self.policies.items()}

    def found(self, collection: str) -> str:
        return self._found.get(collection, self.default)

    def not_found(self, collection: str) -> str:
        return self._not_found.get(collection, NO_STORE)
