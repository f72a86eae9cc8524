"""LOG_JSON: every line is one valid JSON object, whatever the message holds."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from service.adapters.logs import RequestIdFilter, formatter, request_id


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter(json_format=True))
    log = logging.getLogger("wbcache.test-json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log, out
    log.removeHandler(handler)
    log.propagate = True


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    lines = text.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(p, dict) for p in parsed)
    assert all(line.isascii() for line in lines)
    return parsed


def test_every_line_is_json(json_log: tuple[logging.Logger, io.StringIO]) -> None:
    log, out = json_log
    message = (
        "quotes \" and ' , a newline\nlevel=ERROR, a tab\t, non-ASCII caf\u00e9 \u2603 \U0001f600"
    )
    log.info("%s", message)
    log.warning("percent %d%% and a dict %s", 5, {"k": "v'\""})
    token = request_id.set("req-1")
    try:
        log.debug("inside a request")
    finally:
        request_id.reset(token)
    try:
        raise ValueError('boom "quoted"\nsecond line')
    except ValueError:
        log.exception("failed: %s", "caf\u00e9")
    log.info("with stack", stack_info=True)

    first, second, third, fourth, fifth = _lines(out)
    assert first["msg"] == message and first["level"] == "INFO"
    assert first["logger"] == "wbcache.test-json" and first["request_id"] == "-"
    assert second["msg"] == "percent 5% and a dict {'k': 'v\\'\"'}"
    assert third["request_id"] == "req-1" and third["level"] == "DEBUG"
    assert fourth["level"] == "ERROR" and fourth["msg"] == "failed: caf\u00e9"
    exc = fourth["exc_info"]
    assert isinstance(exc, str)
    assert exc.startswith("Traceback") and 'ValueError: boom "quoted"\nsecond line' in exc
    assert "test_every_line_is_json" in str(fifth["stack_info"])
