"""The process's logging, set up once at the edge: JSON lines for machines, readable text for people.

Owns the root handler (stderr), its two formatters and the request-id filter on it.  ``auto`` picks JSON
lines when stderr is not a terminal (a container, a service, a pipe to Vector or Filebeat) and text on a
terminal.  Every line carries ``request_id`` when it was emitted while a call was handled; structured
fields given as ``extra={"fields": {...}}`` (the access log's) become top-level JSON keys, or ``key=value``
pairs in text.  Uvicorn's loggers propagate here, so its lines are formatted the same way.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from inhouse.server.request_id import RequestIdFilter

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601, UTC), level, logger, msg, request_id, the fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        line.update(_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request id] key=value ...``"""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        extra = [f"[{request_id}]"] if request_id is not None else []
        extra += [f"{k}={v}" for k, v in _fields(record).items() if v is not None and k != "request_id"]
        if not extra:
            return text
        head, sep, tail = text.partition("\n")  # a traceback stays below the first line
        return f"{head} {' '.join(extra)}{sep}{tail}"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def setup_logging(level: str, fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one on ``stream`` (stderr) in ``fmt`` (auto, json, text)."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # no handlers of their own: ours, via the root
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
