"""Edge-ready headers without I/O: Cache-Control by COLLECTION_CACHE (and the older
COLLECTION_MAX_AGE), surrogate keys any record key can carry, purge request sizes."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.adapters.edge import chunks
from service.api.cache_headers import CacheHeaders
from service.config import Settings
from service.core import surrogate


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def headers(**values: object) -> CacheHeaders:
    return CacheHeaders(settings(**values))


def test_public_policy_names_every_directive() -> None:
    h = headers(
        collection_cache={
            "products": {
                "public": True,
                "max_age": 60,
                "s_maxage": 300,
                "stale_while_revalidate": 30,
                "stale_if_error": 600,
            }
        }
    )
    assert h.found("products") == (
        "public, max-age=60, s-maxage=300, stale-while-revalidate=30, stale-if-error=600"
    )
    assert h.not_found("products") == "no-store"  # no create hidden behind a 404
    assert h.found("orders") == "private, no-cache"
    assert h.not_found("orders") == "no-store"


def test_private_policies_and_the_older_setting() -> None:
    h = headers(collection_cache={"a": {"max_age": 30}, "b": {}}, collection_max_age={"c": 60})
    assert h.found("a") == "private, max-age=30"
    assert h.found("b") == "private, no-cache"
    assert h.found("c") == "private, max-age=60"  # COLLECTION_MAX_AGE still works


def test_a_public_collection_may_let_edges_keep_404s() -> None:
    h = headers(collection_cache={"p": {"public": True, "s_maxage": 60, "not_found_s_maxage": 5}})
    assert h.not_found("p") == "public, max-age=0, s-maxage=5"


def test_a_collection_in_both_settings_is_refused_with_the_replacement() -> None:
    with pytest.raises(ValidationError) as info:
        settings(collection_cache={"p": {"public": True}}, collection_max_age={"p": 60})
    assert '{"p": {"max_age": 60}}' in str(info.value)


def test_unknown_policy_fields_are_refused() -> None:
    with pytest.raises(ValidationError):
        settings(collection_cache={"p": {"public": True, "smaxage": 60}})


def test_only_public_collections_are_purged_and_only_with_edges() -> None:
    cache = {"p": {"public": True}, "q": {"max_age": 5}}
    assert settings(collection_cache=cache).purged_collections == frozenset()
    with_edges = settings(collection_cache=cache, edge_purge_urls="http://a:6081, http://b/")
    assert with_edges.purged_collections == frozenset({"p"})
    assert with_edges.edge_urls == ["http://a:6081", "http://b"]
    with pytest.raises(ValidationError):
        settings(edge_purge_urls="https://cdn.example.com")


@pytest.mark.parametrize("key", ["plain", "a/b c,d", "é🙂", "%2F", "x" * 512])
def test_surrogate_keys_hold_no_separator_and_round_trip_from_the_queue(key: str) -> None:
    record = surrogate.record_key("c1", key)
    assert record.isascii() and not any(ch in record for ch in " ,\t")
    assert surrogate.header("c1", key) == f"c/c1 {record}"
    assert surrogate.of_queued(f"r:c1:{key}") == record
    assert surrogate.of_queued("c:c1") == surrogate.collection_key("c1") == "c/c1"


def test_purge_requests_fit_varnish_header_limit() -> None:
    keys = [surrogate.record_key("c", "é" * 170) for _ in range(40)]
    groups = list(chunks(keys))
    assert sum(len(g) for g in groups) == 40 and len(groups) > 1
    assert all(len(" ".join(g)) <= 6000 for g in groups)
