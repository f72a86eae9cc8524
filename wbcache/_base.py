"""What both clients are configured with: the base URL, the API key, timeouts, retries."""

from __future__ import annotations

from typing import Any

from wbcache._calls import Call
from wbcache._retry import Retries

USER_AGENT = "wbcache-python"


def client_options(
    base_url: str, api_key: str | None, timeout: float, headers: dict[str, str] | None
) -> dict[str, Any]:
    """The keyword arguments of the one httpx client (sync or async) a wbcache client
    holds: its connections are reused across calls."""
    all_headers = {"User-Agent": USER_AGENT, **(headers or {})}
    if api_key:
        all_headers["Authorization"] = f"Bearer {api_key}"
    return {"base_url": base_url.rstrip("/"), "headers": all_headers, "timeout": timeout}


def retries_of(retries: int | Retries) -> Retries:
    return retries if isinstance(retries, Retries) else Retries(attempts=retries)


def request_options(call: Call[Any]) -> dict[str, Any]:
    """httpx's ``request`` arguments for ``call``, after its method and path."""
    return {"params": call.params, "headers": call.headers, "content": call.content}
