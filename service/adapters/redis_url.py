"""``REDIS_URL`` forms beyond redis-py's own (``redis://``, ``rediss://``, ``unix://``):

``redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/<master-name>[/<db>]``

The hosts are the Sentinels (port 26379 when omitted); the master name is the one their
``sentinel monitor`` lines use; the userinfo, if any, authenticates to the data nodes (the
primary and its replicas), not to the Sentinels.

``redis+cluster://[[user]:password@]host[:port][,host[:port]…]``

The hosts are some of the Cluster's nodes (port 6379 when omitted), where the client
learns the slot map; a Cluster has one database, so no path."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
CLUSTER_SCHEME = "redis+cluster"
CLUSTER_PORT = 6379


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class ClusterUrl:
    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() == SENTINEL_SCHEME


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() == CLUSTER_SCHEME


def _host_port(text: str, url: str, what: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"bad {what} address {text!r} in {url!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"empty {what} host in {url!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad {what} port {port_text!r} in {url!r}")
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class _Parts:
    hosts: str
    path: str
    shown: str  # the URL without its password, for messages
    username: str | None
    password: str | None


def _split(url: str, scheme_wanted: str) -> _Parts:
    shown = url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != scheme_wanted:
        raise ValueError(f"not a {scheme_wanted}:// URL")
    if "?" in rest or "#" in rest:
        raise ValueError(f"{scheme_wanted}:// URLs take no query string or fragment")
    authority, _, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) or None
        if not colon:
            raise ValueError(
                f"{scheme_wanted}:// userinfo without ':': write the password as "
                f"{scheme_wanted}://:password@host (or user:password@host)"
            )
        shown = f"{scheme}://***@{rest[len(userinfo) + 1 :]}"
    return _Parts(hosts, path, shown, username, password)


def parse_cluster_url(url: str) -> ClusterUrl:
    """Parse a ``redis+cluster://`` URL; ``ValueError`` says what is wrong with it (the
    message never repeats a password)."""
    parts = _split(url, CLUSTER_SCHEME)
    if not parts.hosts:
        raise ValueError(f"no Cluster node in {parts.shown!r}")
    if parts.path.strip("/"):
        raise ValueError(
            f"a Cluster has one database: no path in {parts.shown!r} "
            f"({CLUSTER_SCHEME}://host:port[,host:port…])"
        )
    nodes = tuple(
        _host_port(h.strip(), parts.shown, "Cluster node", CLUSTER_PORT)
        for h in parts.hosts.split(",")
    )
    return ClusterUrl(nodes, parts.username, parts.password)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a ``redis+sentinel://`` URL; ``ValueError`` says what is wrong with it (the
    message never repeats a password)."""
    p = _split(url, SENTINEL_SCHEME)
    shown, path, username, password = p.shown, p.path, p.username, p.password
    if not p.hosts:
        raise ValueError(f"no Sentinel host in {shown!r}")
    sentinels = tuple(
        _host_port(h.strip(), shown, "Sentinel", SENTINEL_PORT) for h in p.hosts.split(",")
    )
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
