"""Logging: one key=value line per event, or one JSON object per line (``LOG_JSON``), the
same in the API and the worker; every API line carries the request id (``-`` outside a
request)."""

from __future__ import annotations

import contextvars
import json
import logging
from typing import Any

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every log record (``%(request_id)s``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, whatever the message holds: quotes, newlines, non-ASCII
    (escaped, so the line stays ASCII whatever the stream's encoding) and tracebacks
    (``exc_info``, ``stack_info`` as strings)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, self.datefmt),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=True, default=str, separators=(",", ":"))


def formatter(json_format: bool) -> logging.Formatter:
    if json_format:
        return JsonFormatter()
    return logging.Formatter(
        "ts=%(asctime)s level=%(levelname)s logger=%(name)s request_id=%(request_id)s "
        "msg=%(message)r"
    )


def setup(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter(json_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
