"""Credentials out of what the service shows or prints: URLs (userinfo passwords,
secret-looking query parameters, libpq key=value DSNs) and secret settings. Used by
``/v1/config`` and by ``wbcache up``'s banner."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

from service.config import Settings

# Settings whose whole value is a secret, and URL query parameters that carry one
# (libpq's password, sslpassword and passfile, Redis' password, tokens, keys).
_SECRET_SETTING = re.compile(r"password|passwd|secret|token|api_keys?$", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)
_KEY_VALUE = re.compile(
    r"""(\b[\w.-]*(?:pass|secret|token|key|auth|credential)[\w.-]*\s*=\s*)('[^']*'|\S+)""",
    re.IGNORECASE,
)
REDACTED = "***"


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    if eq and _SECRET_PARAM.search(unquote(name)):
        return f"{name}={REDACTED}"
    return param


def redact_url(url: str) -> str:
    """``url`` without the credentials in it: the userinfo's password (for Redis schemes a
    lone userinfo too, which some clients take as the password) and secret-looking query
    parameters; a string that is no URL (a libpq ``key=value`` DSN) loses secret values."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return _KEY_VALUE.sub(rf"\g<1>{REDACTED}", url)
    # The authority ends at the last '@' before the query: a password may hold '/' or '@'.
    before_query = re.split(r"[?#]", rest, maxsplit=1)[0]
    userinfo, at, _ = before_query.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        if colon:
            hidden = f"{user}:{REDACTED}"
        elif scheme.lower().startswith(("redis", "valkey", "unix")):
            hidden = REDACTED
        else:
            hidden = user
        rest = hidden + rest[len(userinfo) :]
    head, qmark, query = rest.partition("?")
    if qmark:
        query, hash_, fragment = query.partition("#")
        params = "&".join(_redact_param(p) for p in query.split("&"))
        rest = f"{head}?{params}{hash_}{fragment}"
    return f"{scheme}://{rest}"


def redacted_settings(settings: Settings) -> dict[str, Any]:
    """The settings as /v1/config shows them: every URL (or comma-separated list of URLs)
    without credentials, every secret setting as ``***``."""
    cfg = settings.model_dump()
    for name, value in cfg.items():
        if not isinstance(value, str) or not value:
            continue
        if _SECRET_SETTING.search(name):
            cfg[name] = REDACTED
        elif name.endswith("_urls"):
            cfg[name] = ",".join(redact_url(u) for u in value.split(","))
        elif name.endswith("_url") or "://" in value:
            cfg[name] = redact_url(value)
    return cfg
