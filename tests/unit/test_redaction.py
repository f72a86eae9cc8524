"""/v1/config shows no credential, whatever form it takes in a URL or setting."""

from __future__ import annotations

import pytest

from service.config import Settings
from service.redaction import redact_url, redacted_settings

SECRET = "s3cr3t"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # userinfo password
        ("postgresql://app:s3cr3t@db:5432/wb", "postgresql://app:***@db:5432/wb"),
        ("postgres://app:s3cr3t@h1:5432,h2:5432/wb", "postgres://app:***@h1:5432,h2:5432/wb"),
        ("postgresql://app:s3/cr@3t@db/wb", "postgresql://app:***@db/wb"),
        ("postgresql://app:s3cr3t@/wb?host=/run/pg", "postgresql://app:***@/wb?host=/run/pg"),
        # libpq query parameters
        (
            "postgresql://db/wb?user=app&password=s3cr3t&sslmode=require",
            "postgresql://db/wb?user=app&password=***&sslmode=require",
        ),
        ("postgresql://db/wb?sslpassword=s3cr3t", "postgresql://db/wb?sslpassword=***"),
        ("postgresql://db/wb?passfile=/s3cr3t/.pgpass", "postgresql://db/wb?passfile=***"),
        ("postgresql://db/wb?PASSWORD=s3cr3t#x", "postgresql://db/wb?PASSWORD=***#x"),
        ("postgresql://db/wb?pass%77ord=s3cr3t", "postgresql://db/wb?pass%77ord=***"),
        # Redis: :password@, user:password@, a lone userinfo, ?password=
        ("redis://:s3cr3t@cache:6379/0", "redis://:***@cache:6379/0"),
        ("rediss://app:s3cr3t@cache:6380/1", "rediss://app:***@cache:6380/1"),
        ("redis://s3cr3t@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://cache:6379/0?password=s3cr3t", "redis://cache:6379/0?password=***"),
        (
            "redis+sentinel://:s3cr3t@s1:26379,s2:26379/mymaster/0",
            "redis+sentinel://:***@s1:26379,s2:26379/mymaster/0",
        ),
        ("unix://:s3cr3t@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        # libpq key=value DSN
        ("host=db user=app password=s3cr3t", "host=db user=app password=***"),
        ("host=db password='s3 cr3t' dbname=wb", "host=db password=*** dbname=wb"),
        # nothing to hide
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (
            "postgresql://app@db/wb?sslmode=verify-full",
            "postgresql://app@db/wb?sslmode=verify-full",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cr3t" not in shown and "cr3t" not in shown.replace("***", "")


def test_settings_show_no_secret() -> None:
    settings = Settings(
        redis_url=f"redis://app:{SECRET}@cache:6379/0?password={SECRET}",
        database_url=f"postgresql://app:{SECRET}@db/wb?sslpassword={SECRET}&passfile=/p",
        api_keys=f"{SECRET}:admin,other{SECRET}:read",
    )
    cfg = redacted_settings(settings)
    assert SECRET not in repr(cfg)
    assert cfg["api_keys"] == "***"
    assert cfg["redis_url"] == "redis://app:***@cache:6379/0?password=***"
    assert cfg["redis_prefix"] == settings.redis_prefix  # the rest as it is
