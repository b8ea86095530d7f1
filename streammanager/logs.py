"""Structured logging: one JSON object per line with fixed field names, or plain text for humans."""
from __future__ import annotations

import json
import logging
import sys
import threading
import time

# Fields a log call may pass with ``extra=``; they are emitted under these names.
FIELDS = ("node_id", "region", "role", "scope", "stream", "action", "group", "pid", "status")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                doc[name] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [f"{n}={getattr(record, n)}" for n in FIELDS if getattr(record, n, None) is not None]
        return f"{line} {' '.join(extras)}" if extras else line


class _Context(logging.Filter):
    """Gives every line the process's own fields (a node agent's ``node_id``) where the call passed none:
    the lines of libraries (kazoo's "Session has expired", the connection's retries) named no node."""

    def __init__(self, fields: dict[str, str]):
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self._fields.items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def configure(level: str = "INFO", fmt: str = "json", context: dict[str, str] | None = None) -> None:
    """Log to stderr in ``fmt``; ``context``: fields (of :data:`FIELDS`) that every line carries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if context:
        handler.addFilter(_Context(dict(context)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kazoo.client").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # urllib3's debug lines carry whole URLs, query included: a KEY_VERIFICATION_URL or
    # EVENT_CALLBACK_URL with a token in its query (``?apikey=...``) was written to the log at DEBUG
    logging.getLogger("urllib3").setLevel(max(logging.INFO, root.level))


class Throttle:
    """Lets a line that any client can repeat (a refused credential) through at most once per
    ``interval_s``: :meth:`allow` answers None to hold it back, or how many were held back since the
    last one let through. At thousands of requests a second, a line each filled the log."""

    def __init__(self, interval_s: float = 10.0):
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._last: float | None = None
        self._held = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last < self._interval_s:
                self._held += 1
                return None
            held, self._held, self._last = self._held, 0, now
            return held


def held_back(count: int) -> str:
    """The suffix of a throttled line: how many like it were not logged."""
    return f" ({count} more like it not logged)" if count else ""
