"""Process logging: one line per record on stderr, JSON outside dev.

Every line carries the request it was logged for (`x-request-id`) and, with tracing on,
the trace id, so a line found in the logs leads to the request's record and its trace.
"""

from __future__ import annotations

import atexit
import copy
import logging
import logging.handlers
import sys
import time
from contextvars import ContextVar
from queue import Full, Queue

import orjson
from opentelemetry import trace

from app.observability.access_log import render_json, render_text
from app.observability.redact import redact_text

# Set by the fast path and the request-id middleware for the task serving a request.
# Lines waiting for the writer thread; past this, new lines are dropped (and counted).
LOG_QUEUE = 10_000
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
        batch = getattr(record, "requests", None)
        if batch is not None:  # the access log's lines, one per request
            return render_json(batch, getattr(record, "bodies", False))
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        for name in ("request_id", "trace_id"):
            value = getattr(record, name, None)
            if value:
                out[name] = value
        if record.exc_info:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = redact_text(record.exc_text)
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        batch = getattr(record, "requests", None)
        if batch is not None:
            return render_text(batch, getattr(record, "bodies", False))
        line = super().format(record)
        ids = [
            v for v in (getattr(record, "request_id", None), getattr(record, "trace_id", None)) if v
        ]
        return redact_text(f"{line} [{' '.join(ids)}]" if ids else line)


class _Enqueue(logging.handlers.QueueHandler):
    def __init__(self, queue: Queue[logging.LogRecord], writer: logging.Handler) -> None:
        super().__init__(queue)
        self.listener = logging.handlers.QueueListener(queue, writer)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except Full:
            self.dropped += 1  # the writer is this far behind: losing lines beats waiting

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The message is merged with its arguments here (they may not outlive the call),
        # the traceback kept as text; formatting and redaction happen in the writer.
        record = copy.copy(record)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


def configure_logging(level: str = "INFO", *, json: bool = False) -> None:
    """Root logging for a process. Lines are queued where they are logged and written by
    a thread: a slow stderr (a full pipe) never stalls the event loop, and masking PII and
    secrets in every line costs the request path nothing."""
    root = logging.getLogger()
    for old in root.handlers:
        if isinstance(old, _Enqueue):
            old.listener.stop()
            atexit.unregister(old.listener.stop)
    formatter = JsonFormatter() if json else TextFormatter()
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(formatter)
    handler = _Enqueue(Queue(LOG_QUEUE), writer)
    handler.addFilter(RequestContext())  # in the logging thread: the context is there
    handler.listener.start()
    atexit.register(handler.listener.stop)  # writes what is queued before exiting
    root.handlers[:] = [handler]
    # arq (the worker) goes through ours. uvicorn's lines are written at once, masked and
    # formatted like ours: uvicorn re-raises the signal that stopped it right after its
    # last line, which ends the process before a queue's thread could write it.
    direct = logging.StreamHandler(sys.stderr)
    direct.setFormatter(formatter)
    direct.addFilter(RequestContext())
    for name, handlers in (("arq", []), ("uvicorn", [direct])):
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate = not handlers
    for name in ("uvicorn.error", "uvicorn.access"):  # to "uvicorn", then no further
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # DEBUG is for the gateway's own loggers. Libraries' debug output is beyond its
    # control and may carry secrets: aiosqlite logs every statement with its parameters,
    # API key hashes included.
    own = logging.getLogger("flywheel")
    own.setLevel(level.upper())
    root.setLevel(max(own.level, logging.INFO))
