"""/dashboard: the operator's page, self-contained (every asset is served from here, none
from elsewhere) and cached the way static sites should be: the page itself revalidates on
every load (``no-cache`` + ETag), while its assets live at URLs that carry a hash of their
content and are cached for a year (``immutable``). A deploy that changes an asset changes
its URL, so a browser never mixes an old script with a new page."""

from __future__ import annotations

import hashlib
import html
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response

from service.api.auth import PUBLIC, ScopedRoute, requires
from service.api.errors import ApiError

PAGE_CACHE_CONTROL = "no-cache"
ASSET_CACHE_CONTROL = "public, max-age=31536000, immutable"
STATIC_PREFIX = "/dashboard/static/"

_MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# The page talks to its own origin only; nothing runs inline and nothing comes from elsewhere.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_ASSET_REF = re.compile(r"\{\{asset:([A-Za-z0-9_.-]+)\}\}")
_ROOT_REF = "{{root}}"


def fingerprint(data: bytes) -> str:
    """The content hash that goes into an asset's URL: the first 12 hex digits of SHA-256."""
    return hashlib.sha256(data).hexdigest()[:12]


def fingerprinted_name(name: str, data: bytes) -> str:
    """``app.js`` → ``app.<fingerprint>.js``."""
    stem, dot, ext = name.rpartition(".")
    if not dot:
        return f"{name}.{fingerprint(data)}"
    return f"{stem}.{fingerprint(data)}.{ext}"


@dataclass(frozen=True, slots=True)
class Asset:
    name: str  # as in the source folder: app.js
    url_name: str  # as served: app.<fingerprint>.js
    body: bytes
    media_type: str

    @property
    def etag(self) -> str:
        return f'"{fingerprint(self.body)}"'


@dataclass(frozen=True, slots=True)
class Bundle:
    template: str  # index.html with asset references resolved; {{root}} left for requests
    assets: Mapping[str, Asset]  # by url_name

    def url_of(self, name: str) -> str:
        for a in self.assets.values():
            if a.name == name:
                return STATIC_PREFIX + a.url_name
        raise KeyError(name)

    def page(self, root_path: str = "") -> bytes:
        return self.template.replace(_ROOT_REF, html.escape(root_path)).encode()


def load_bundle(directory: Traversable) -> Bundle:
    """Read the dashboard's files, fingerprint the assets and resolve the page's
    ``{{asset:NAME}}`` references into ``{{root}}/dashboard/static/NAME.<hash>.EXT``."""
    by_name: dict[str, Asset] = {}
    for entry in sorted(directory.iterdir(), key=lambda e: e.name):
        ext = "." + entry.name.rpartition(".")[2]
        if not entry.is_file() or entry.name == "index.html" or ext not in _MEDIA_TYPES:
            continue
        body = entry.read_bytes()
        by_name[entry.name] = Asset(
            entry.name, fingerprinted_name(entry.name, body), body, _MEDIA_TYPES[ext]
        )

    def resolve(m: re.Match[str]) -> str:
        asset = by_name.get(m.group(1))
        if asset is None:
            raise ValueError(f"index.html refers to a missing dashboard asset {m.group(1)!r}")
        return _ROOT_REF + STATIC_PREFIX + asset.url_name

    template = _ASSET_REF.sub(resolve, (directory / "index.html").read_text("utf-8"))
    return Bundle(template, {a.url_name: a for a in by_name.values()})


BUNDLE = load_bundle(files("service") / "dashboard")

router = APIRouter(
    tags=["dashboard"],
    include_in_schema=False,
    route_class=ScopedRoute,
    dependencies=[requires(PUBLIC)],
)


def _not_modified(request: Request, etag: str) -> bool:
    """Weak comparison of If-None-Match (RFC 9110 §13.1.2) against our strong ETag."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    tags = [t.strip() for t in header.split(",")]
    return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)


def _respond(
    request: Request,
    body: bytes,
    media_type: str,
    etag: str,
    cache_control: str,
    extra: Mapping[str, str] | None = None,
) -> Response:
    headers = {"ETag": etag, "Cache-Control": cache_control, **(extra or {})}
    if _not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.api_route("/dashboard", methods=["GET", "HEAD"])
async def dashboard_page(request: Request) -> Response:
    body = BUNDLE.page(request.scope.get("root_path", ""))
    etag = f'"{fingerprint(body)}"'
    return _respond(
        request, body, "text/html; charset=utf-8", etag, PAGE_CACHE_CONTROL, _PAGE_HEADERS
    )


@router.api_route("/dashboard/static/{name}", methods=["GET", "HEAD"])
async def dashboard_asset(name: str, request: Request) -> Response:
    asset = BUNDLE.assets.get(name)
    if asset is None:
        raise ApiError(
            404,
            "not_found",
            f"No dashboard asset {name!r}: asset names carry a hash of their content and "
            "change with every release; reload /dashboard for the current ones.",
        )
    return _respond(
        request,
        asset.body,
        asset.media_type,
        asset.etag,
        ASSET_CACHE_CONTROL,
        {"X-Content-Type-Options": "nosniff"},
    )
