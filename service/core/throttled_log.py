"""A warning that repeats (a dependency down, retried) logged once, then at most once per
interval, with the count of those left out."""

from __future__ import annotations

import logging
import time


class ThrottledLog:
    """Logs a repeating failure once, then at most once per ``every`` seconds."""

    def __init__(self, log: logging.Logger, every: float = 30.0) -> None:
        self.log = log
        self.every = every
        self.last = 0.0
        self.suppressed = 0

    def warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            extra = f" ({self.suppressed} similar messages suppressed)" if self.suppressed else ""
            self.log.warning(msg + extra, *args)
            self.last = now
            self.suppressed = 0
        else:
            self.suppressed += 1
