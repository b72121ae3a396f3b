"""Process logging: one line per record on stderr, JSON outside dev.

Every line carries the request it was logged for (`x-request-id`) and, with tracing on,
the trace id, so a line found in the logs leads to the request's record and its trace.
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar

import orjson
from opentelemetry import trace

# Set by the fast path and the request-id middleware for the task serving a request.
REQUEST_ID: ContextVar[str | None] = ContextVar("flywheel_request_id", default=None)


class RequestContext(logging.Filter):
    """Adds `request_id` and `trace_id` (None outside a request, or with tracing off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        ctx = trace.get_current_span().get_span_context()
        record.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in ("request_id", "trace_id"):
            value = getattr(record, name, None)
            if value:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            v for v in (getattr(record, "request_id", None), getattr(record, "trace_id", None)) if v
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContext())
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # DEBUG is for the gateway's own loggers. Libraries' debug output is beyond its
    # control and may carry secrets: aiosqlite logs every statement with its parameters,
    # API key hashes included.
    own = logging.getLogger("flywheel")
    own.setLevel(level.upper())
    root.setLevel(max(own.level, logging.INFO))
