"""API keys: ``API_KEYS`` holds comma-separated ``key:scope`` pairs, scope read, write or
admin (admin includes write, write includes read). Unset means open."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum


class Scope(IntEnum):
    READ = 1
    WRITE = 2
    ADMIN = 3


class ApiKeyError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKeys:
    keys: tuple[tuple[bytes, Scope], ...]

    @classmethod
    def parse(cls, spec: str) -> ApiKeys:
        keys = []
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            key, sep, scope = item.rpartition(":")
            if not sep or not key:
                raise ApiKeyError("API_KEYS entries are key:scope (scope read, write or admin)")
            try:
                keys.append((key.encode(), Scope[scope.strip().upper()]))
            except KeyError:
                raise ApiKeyError(
                    f"unknown API key scope {scope!r}: use read, write or admin"
                ) from None
        return cls(tuple(keys))

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def scope_of(self, presented: bytes) -> Scope | None:
        """The scope of a presented key. Compares against every key in constant time, so
        timing tells nothing about which key or how much of it matched."""
        found: Scope | None = None
        for key, scope in self.keys:
            if hmac.compare_digest(key, presented):
                found = scope
        return found


_OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/dashboard")


def required_scope(method: str, path: str, metrics_public: bool) -> Scope | None:
    """What a request needs; None when it is open to everyone."""
    if path == "/metrics":
        return None if metrics_public else Scope.READ
    if not path.startswith("/v1/"):
        return None if path.startswith(_OPEN_PATHS) or path == "/" else Scope.READ
    if path.startswith(("/v1/invalidate", "/v1/dead-letters")):
        return Scope.ADMIN
    if method in ("GET", "HEAD", "OPTIONS"):
        return Scope.READ
    return Scope.WRITE
