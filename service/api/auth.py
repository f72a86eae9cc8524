"""API keys: ``API_KEYS`` holds comma-separated ``key:scope`` pairs, scope read, write or
admin (admin includes write, write includes read). Unset means open.

Every route declares what it needs next to its path, as a dependency
(``dependencies=[requires(Scope.ADMIN)]``, the template's ``api/deps.py`` way); the
records lane reads the same declaration from the records route table. ``ScopedRoute``
checks it before FastAPI reads the body, so an unauthenticated request is refused before
any of its bytes are parsed. Unmatched paths need nothing and answer a plain 404.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.types import Receive, Send
from starlette.types import Scope as Scope_

from service.api.errors import ApiError, answer


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


@dataclass(frozen=True, slots=True)
class Requirement:
    """What a route needs: a scope, or None for everyone. ``metrics`` marks the one
    requirement the deployment can waive (``METRICS_PUBLIC``)."""

    scope: Scope | None
    metrics: bool = False

    async def __call__(self, request: Request) -> None:
        # Normally ScopedRoute has already checked; this keeps the declaration enforcing
        # wherever it is used.
        refusal = guard_of(request.scope).refusal(request.scope, self)
        if refusal is not None:
            raise refusal


PUBLIC = Requirement(None)
READ = Requirement(Scope.READ)
WRITE = Requirement(Scope.WRITE)
ADMIN = Requirement(Scope.ADMIN)
METRICS = Requirement(Scope.READ, metrics=True)


def requires(requirement: Requirement) -> Any:
    """``dependencies=[requires(ADMIN)]`` on a route or router."""
    return Depends(requirement)


def _bearer(scope: Scope_) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            kind, _, token = value.partition(b" ")
            token_bytes: bytes = token.strip()
            if kind.lower() == b"bearer" and token_bytes:
                return token_bytes
    return None


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "Send a valid API key as 'Authorization: Bearer <key>'.",
        {"WWW-Authenticate": 'Bearer realm="wbcache"'},
    )


@dataclass(frozen=True, slots=True)
class Guard:
    """The app's keys and settings, to decide a request against a route's requirement."""

    keys: ApiKeys
    metrics_public: bool

    def refusal(self, scope: Scope_, requirement: Requirement) -> ApiError | None:
        """None when the request may go on, else the 401/403 to answer."""
        needed = requirement.scope
        if needed is None or not self.keys.enabled:
            return None
        if requirement.metrics and self.metrics_public:
            return None
        token = _bearer(scope)
        has = self.keys.scope_of(token) if token is not None else None
        if has is None:
            return _unauthorized()
        if has < needed:
            return ApiError(
                403,
                "forbidden",
                f"This API key has scope {has.name.lower()}; this request needs "
                f"{needed.name.lower()}.",
            )
        return None


def guard_of(scope: Scope_) -> Guard:
    guard: Guard = scope["app"].state.guard
    return guard


def declared(dependencies: list[Any]) -> Requirement | None:
    """The Requirement among a route's dependencies (None when it declares none)."""
    found = [d.dependency for d in dependencies if isinstance(d.dependency, Requirement)]
    if len(found) > 1:
        raise TypeError(f"a route declares more than one requirement: {found}")
    return found[0] if found else None


class ScopedRoute(APIRoute):
    """An APIRoute that must declare its Requirement and checks it first, before FastAPI
    reads the body or solves the other dependencies."""

    def __init__(self, path: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        requirement = declared(self.dependencies)
        if requirement is None:
            raise TypeError(f"{path}: declare what it needs with dependencies=[requires(...)]")
        self.requirement = requirement

    async def handle(self, scope: Scope_, receive: Receive, send: Send) -> None:
        refusal = guard_of(scope).refusal(scope, self.requirement)
        if refusal is not None:
            await answer(refusal)(scope, receive, send)
            return
        await super().handle(scope, receive, send)
