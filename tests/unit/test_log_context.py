"""Every log line names its request (`x-request-id`) and trace, in JSON and in text."""

from __future__ import annotations

import io
import logging

import orjson
from opentelemetry.sdk.trace import TracerProvider

from app.observability.logging import REQUEST_ID, JsonFormatter, RequestContext, TextFormatter


def _line(formatter: logging.Formatter) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RequestContext())
    handler.setFormatter(formatter)
    log = logging.getLogger("flywheel.test.context")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("upstream said no")
    finally:
        log.removeHandler(handler)
    return out.getvalue().strip()


def test_request_and_trace_ids_on_each_line() -> None:
    tracer = TracerProvider().get_tracer("t")
    token = REQUEST_ID.set("chatcmpl-abc")
    try:
        with tracer.start_as_current_span("request") as span:
            trace_id = format(span.get_span_context().trace_id, "032x")
            as_json = orjson.loads(_line(JsonFormatter()))
            as_text = _line(TextFormatter())
    finally:
        REQUEST_ID.reset(token)
    assert as_json["request_id"] == "chatcmpl-abc"
    assert as_json["trace_id"] == trace_id
    assert as_json["msg"] == "upstream said no"
    assert as_text.endswith(f"upstream said no [chatcmpl-abc {trace_id}]")
    outside = orjson.loads(_line(JsonFormatter()))  # no request, no trace: no fields
    assert "request_id" not in outside
    assert "trace_id" not in outside
