"""`wbcache up` and the memcached port: 11211 when free, MEMCACHED_PORT when set, else off
with the reason (the banner prints it). The port probe is replaced: tests of other
checkouts may hold 11211 on a shared machine, so the real one cannot be relied on."""

from __future__ import annotations

import pytest

from service.dev import up


def test_up_serves_11211_when_free_else_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEMCACHED_PORT", raising=False)
    monkeypatch.setattr(up, "_port_free", lambda host, port: None)
    assert up._memcached_port("127.0.0.1") == (11211, "")
    monkeypatch.setattr(up, "_port_free", lambda host, port: "address already in use")
    port, why = up._memcached_port("127.0.0.1")
    assert port is None and "11211" in why and "MEMCACHED_PORT" in why
    monkeypatch.setenv("MEMCACHED_PORT", "12345")
    assert up._memcached_port("127.0.0.1") == (12345, "")
