"""Settings: those the Lua scripts depend on are bounded at start, not at the first flush;
every one is documented in the README."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings


@pytest.mark.parametrize("size", [0, 3001, 10_000])
def test_batch_size_outside_what_the_scripts_take_is_refused(size: int) -> None:
    with pytest.raises(ValidationError, match="batch_size"):
        Settings(batch_size=size)


def test_batch_size_bounds_are_accepted() -> None:
    assert Settings(batch_size=1).batch_size == 1
    assert Settings(batch_size=3000).batch_size == 3000


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"| `{name.upper()}` |" not in readme]
    assert not missing, f"settings without a README row: {missing}"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://127.0.0.1:6379/0", "must start with one of"),
        ("redis+sentinel://127.0.0.1:26379", "no master name"),
        ("redis+sentinel://127.0.0.1:notaport/mymaster", "bad Sentinel port"),
        ("redis+cluster://", "no Cluster node"),
        ("redis+cluster://a:7000,b:x", "bad Cluster node port"),
        ("redis+cluster://a:7000/0", "one database"),
    ],
)
def test_a_malformed_redis_url_is_refused_at_start(url: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(redis_url=url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "rediss://h:6380",
        "redis+sentinel://a:26379,b/mymaster/2",
        "redis+cluster://a:7000,b:7001,[::1]:7002",
        "redis+cluster://:secret@a:7000/",
    ],
)
def test_redis_url_forms_accepted(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


def test_shards_default_to_one_untagged_and_sixteen_on_a_cluster() -> None:
    assert (Settings().shards, Settings().sharded) == (1, False)
    cluster = Settings(redis_url="redis+cluster://a:7000")
    assert (cluster.shards, cluster.sharded) == (16, True)
    assert Settings(redis_shards=4).sharded


def test_a_prefix_with_braces_is_refused_with_shards() -> None:
    assert Settings(redis_prefix="{x}:").redis_prefix == "{x}:"  # no shards: allowed
    with pytest.raises(ValidationError, match="must not contain"):
        Settings(redis_prefix="{x}:", redis_shards=2)


def test_arq_redis_url_must_be_standalone() -> None:
    with pytest.raises(ValidationError, match="ARQ_REDIS_URL"):
        Settings(arq_redis_url="redis+cluster://a:7000")
    assert Settings(arq_redis_url="redis://a:6379/1").arq_redis_url == "redis://a:6379/1"
