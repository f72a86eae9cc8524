"""Logging: one key=value line per event, the same in the API and the worker; every API
line carries the request id (``-`` outside a request)."""

from __future__ import annotations

import logging

from service.api.middleware import RequestIdFilter


def setup(level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if json_format:
        fmt = (
            '{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s",'
            '"request_id":"%(request_id)s","msg":%(message)r}'
        )
    else:
        fmt = (
            "ts=%(asctime)s level=%(levelname)s logger=%(name)s request_id=%(request_id)s "
            "msg=%(message)r"
        )
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
