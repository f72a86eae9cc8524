"""``REDIS_URL`` forms beyond redis-py's own (``redis://``, ``rediss://``, ``unix://``):

``redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<master-name>[/<db>]``

The hosts are the Sentinels (port 26379 when omitted); the master name is the one their
``sentinel monitor`` lines use; the userinfo, if any, authenticates to the data nodes (the
primary and its replicas), not to the Sentinels."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() == SENTINEL_SCHEME


def _host_port(text: str, url: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad Sentinel address {text!r} in {url!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"empty Sentinel host in {url!r}")
    if not port_text:
        return host, SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad Sentinel port {port_text!r} in {url!r}")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` URL; ``ValueError`` says what is wrong with it (the
    message never repeats a password)."""
    shown = url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    if "?" in rest or "#" in rest:
        raise ValueError(f"{SENTINEL_SCHEME}:// URLs take no query string or fragment")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
        if not colon:
            raise ValueError(
                f"{SENTINEL_SCHEME}:// userinfo without ':': write the password as "
                f"{SENTINEL_SCHEME}://:password@host (or user:password@host)"
            )
        shown = f"{scheme}://***@{rest[len(userinfo) + 1 :]}"
    if not hosts:
        raise ValueError(f"no Sentinel host in {shown!r}")
    sentinels = tuple(_host_port(h.strip(), shown) for h in hosts.split(","))
    parts = path.split("/") if path else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise ValueError(f"no master name in {shown!r}: {SENTINEL_SCHEME}://host:port/<master>")
    if len(parts) > 2:
        raise ValueError(f"too many path segments in {shown!r}: /<master>[/<db>]")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise ValueError(f"the database in {shown!r} must be a number")
        db = int(parts[1])
    return SentinelUrl(sentinels, unquote(parts[0]), db, username, password)
