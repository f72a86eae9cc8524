"""/dashboard: fingerprinted assets and their caching headers, and the page itself in a real
headless Chromium (Debian's ``chromium`` package; the test never downloads a browser)
against real ``wbcache serve`` and ``wbcache worker`` processes, Redis and Postgres."""

from __future__ import annotations

import contextlib
import os
import re
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from playwright.async_api import ConsoleMessage, Dialog, Page, Request, async_playwright

from service.api.dashboard import (
    ASSET_CACHE_CONTROL,
    BUNDLE,
    fingerprint,
    load_bundle,
)
from tests.conftest import wait_until
from tests.support.procs import ApiProc, WorkerProc

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_KEY = "wbtest-dashboard-admin-key"
COLLECTION = "dash"
WAIT_MS = 30_000  # for anything that needs a process to start or a flush to happen
REPO = Path(__file__).resolve().parents[2]

ProcsFactory = Callable[..., ApiProc | WorkerProc]


# -- fingerprints (no servers) -----------------------------------------------------------


def _write_site(root: Path, js: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text(
        '<link rel="stylesheet" href="{{asset:app.css}}"><script src="{{asset:app.js}}"></script>'
    )
    (root / "app.js").write_text(js)
    (root / "app.css").write_text("body { color: black; }")


def test_asset_urls_carry_a_hash_of_their_content(tmp_path: Path) -> None:
    _write_site(tmp_path / "v1", "console.log(1);")
    _write_site(tmp_path / "v2", "console.log(2);")
    one, two = load_bundle(tmp_path / "v1"), load_bundle(tmp_path / "v2")

    js1, js2 = one.url_of("app.js"), two.url_of("app.js")
    assert js1 == f"/dashboard/static/app.{fingerprint(b'console.log(1);')}.js"
    assert js1 != js2, "a changed asset must get a new URL"
    assert one.url_of("app.css") == two.url_of("app.css"), "an unchanged asset keeps its URL"
    assert js1.encode() in one.page() and js2.encode() in two.page()
    assert one.page() != two.page()
    assert b"{{" not in one.page()
    assert one.page("/behind/a/proxy").count(b'"/behind/a/proxy/dashboard/static/') == 2

    (tmp_path / "v2" / "index.html").write_text('<script src="{{asset:missing.js}}"></script>')
    with pytest.raises(ValueError, match="missing.js"):
        load_bundle(tmp_path / "v2")

    # The shipped bundle: every URL names the hash of the file as it is on disk.
    shipped = REPO / "service" / "dashboard"
    for asset in BUNDLE.assets.values():
        body = (shipped / asset.name).read_bytes()
        assert asset.url_name.split(".")[-2] == fingerprint(body) == asset.etag.strip('"')


# -- headers (the app in-process) ----------------------------------------------------------


async def test_page_revalidates_and_assets_are_immutable(api: httpx.AsyncClient) -> None:
    r = await api.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    etag = r.headers["etag"]
    again = await api.get("/dashboard", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.headers["etag"] == etag and again.headers["cache-control"] == "no-cache"

    # Self-contained: nothing from another origin, every asset fingerprinted and ours.
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", r.text)
    urls = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert len(urls) >= 3, urls
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for url in urls:
        m = re.fullmatch(r"/dashboard/static/[a-z]+\.([0-9a-f]{12})(\.[a-z]+)", url)
        assert m, f"{url} is not a fingerprinted dashboard asset"
        a = await api.get(url)
        assert a.status_code == 200, url
        assert a.headers["cache-control"] == ASSET_CACHE_CONTROL
        assert a.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert a.headers["content-type"].startswith(types[m.group(2)]), url
        assert fingerprint(a.content) == m.group(1), f"{url} does not hash to its name"
        assert a.headers["etag"] == f'"{m.group(1)}"'
        cached = await api.get(url, headers={"If-None-Match": f'W/"{m.group(1)}"'})
        assert cached.status_code == 304 and cached.content == b""
        head = await api.head(url)
        assert head.status_code == 200
        assert head.headers["cache-control"] == ASSET_CACHE_CONTROL

    # An old or made-up fingerprint is a 404 with the JSON error body, never another file.
    js = next(u for u in urls if u.endswith(".js"))
    for stale in (re.sub(r"\.[0-9a-f]{12}\.", ".000000000000.", js), "/dashboard/static/app.js"):
        gone = await api.get(stale)
        assert gone.status_code == 404, stale
        assert gone.json()["error"]["code"] == "not_found"
        assert "reload /dashboard" in gone.json()["error"]["message"]


# -- the page in a browser -----------------------------------------------------------------


@contextlib.asynccontextmanager
async def chromium_page(profile: Path, origin: str) -> AsyncIterator[Page]:
    """A fresh headless Chromium profile with one page; fails the test if the page throws,
    logs an unexpected console error, or requests anything from another origin."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    problems: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        # fetch() answered 401 before the key was entered: expected, logged by Chromium.
        if msg.type == "error" and "status of 401" not in msg.text:
            problems.append(f"console error: {msg.text}")

    def on_request(req: Request) -> None:
        if not req.url.startswith(origin + "/"):
            problems.append(f"request to another origin: {req.url}")

    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 800},
            device_scale_factor=1,
            service_workers="block",
        )
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", on_console)
            page.on("request", on_request)
            yield page
        finally:
            await context.close()
    assert not problems, problems


async def _number(page: Page, element_id: str) -> float:
    value = await page.get_attribute(f"#{element_id}", "data-value")
    assert value not in (None, ""), f"#{element_id} shows no number"
    return float(value)


async def _wait_js(page: Page, expression: str, timeout_ms: int = WAIT_MS) -> None:
    # A function, not a bare expression: the page's CSP forbids eval() of strings.
    await page.wait_for_function(f"() => {expression}", timeout=timeout_ms, polling=100)


def _value(element_id: str) -> str:
    """A page expression: the number an element shows (NaN while it shows none)."""
    return f"Number(document.getElementById('{element_id}').dataset.value || NaN)"


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


async def test_dashboard_live_queue_and_dead_letters(
    procs: ProcsFactory, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    api = procs("api", API_KEYS=f"{ADMIN_KEY}:admin")
    assert isinstance(api, ApiProc)
    n = 40
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with (
        httpx.AsyncClient(base_url=api.url, headers=headers, timeout=10) as client,
        chromium_page(tmp_path / "chromium-profile", api.url) as page,
    ):
        await page.goto(f"{api.url}/dashboard")

        # The API wants a key: the page asks for one and sends it as a Bearer token.
        await page.wait_for_selector("#auth", state="visible")
        assert "needs a key" in await page.inner_text("#auth-message")
        await page.fill("#api-key", ADMIN_KEY)
        await page.click("#api-key-save")
        await _wait_js(page, f"{_value('pending')} === 0 && {_value('workers')} === 0")
        await page.wait_for_selector("#auth", state="hidden", timeout=15_000)
        stored = await page.evaluate("sessionStorage.getItem('wbcache.apiKey')")
        assert stored == ADMIN_KEY
        await page.wait_for_selector('#config [data-setting="write_delay_ms"]')
        assert await page.inner_text('#config [data-setting="api_keys"] .val') == "***"

        # (1) No worker: accepted writes pile up, on the numbers and on the chart (in
        # steps the page sees one by one).
        for step in range(0, n, n // 4):
            for i in range(step, step + n // 4):
                r = await client.put(f"/v1/{COLLECTION}/k{i}", json={"n": i})
                assert r.status_code == 201, r.text
                assert (await client.get(f"/v1/{COLLECTION}/k{i}")).status_code == 200
            await _wait_js(page, f"{_value('pending')} === {step + n // 4}")
        await _wait_js(
            page,
            f"{_value('pending')} === {n} && "
            f"Number(document.getElementById('chart-pending').dataset.max) >= {n}",
        )
        assert await _number(page, "lag") > 0
        assert await _number(page, "workers") == 0
        assert await page.is_visible("#workers.alarm"), "no worker with writes pending: alarm"

        # A worker starts: the queue drains to 0 on the page, and the rows are in Postgres.
        procs("worker")
        await _wait_js(page, f"{_value('workers')} >= 1 && {_value('pending')} === 0")
        assert await pg.fetchval("SELECT count(*) FROM records WHERE collection = $1", COLLECTION)
        assert await page.locator("#worker-list tr").count() >= 1
        await _wait_js(page, f"{_value('flushed')} >= {n} && {_value('hit-ratio')} > 0")

        # (2) A write Postgres refuses for good becomes a dead letter the page lists.
        constraint = f"wbcache_test_no_poison_{uuid.uuid4().hex[:8]}"
        await pg.execute(
            f"ALTER TABLE records ADD CONSTRAINT {constraint} CHECK (NOT (value ? 'poison'))"
        )
        try:
            versions = {}
            for key in ("poison-a", "poison-b"):
                r = await client.put(f"/v1/{COLLECTION}/{key}", json={"poison": True})
                assert r.status_code == 201, r.text
                versions[key] = r.json()["version"]
            row_a = page.locator('#dead-letter-rows tr[data-key="poison-a"]')
            row_b = page.locator('#dead-letter-rows tr[data-key="poison-b"]')
            await row_a.wait_for()
            await row_b.wait_for()
            await _wait_js(page, f"{_value('dead-letters')} === 2 && {_value('pending')} === 0")
            assert await row_a.get_attribute("data-version") == str(versions["poison-a"])
            assert "23514" in await row_a.inner_text(), await row_a.inner_text()
            assert constraint in await row_a.locator("td.error").inner_text()

            shot = (
                REPO / "docs" / "dashboard.png"
                if os.environ.get("WBCACHE_SCREENSHOT") == "1"
                else tmp_path / "dashboard.png"
            )
            shot.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(shot))
            assert _png_size(shot) == (1200, 800)

            # Drop asks first; once confirmed the write is gone and reads show Postgres.
            dialogs: list[str] = []

            async def accept(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()

            page.once("dialog", accept)
            await row_b.locator("button.drop").click()
            await row_b.wait_for(state="detached")
            assert dialogs and "poison-b" in dialogs[0], dialogs
            assert (await client.get(f"/v1/{COLLECTION}/poison-b")).status_code == 404
        finally:
            await pg.execute(f"ALTER TABLE records DROP CONSTRAINT IF EXISTS {constraint}")

        # The cause is fixed: Retry puts the write back and it lands with its version.
        await row_a.locator("button.retry").click()
        await row_a.wait_for(state="detached")
        await _wait_js(page, f"{_value('dead-letters')} === 0 && {_value('pending')} === 0")

        async def landed() -> bool:
            version = await pg.fetchval(
                "SELECT version FROM records WHERE collection = $1 AND key = $2",
                COLLECTION,
                "poison-a",
            )
            return bool(version == versions["poison-a"])

        await wait_until(landed, timeout=WAIT_MS / 1000)
        assert "Retried 1" in await page.inner_text("#dead-letter-message")
        assert (
            await pg.fetchval(
                "SELECT count(*) FROM records WHERE collection = $1 AND key = 'poison-b'",
                COLLECTION,
            )
            == 0
        )
