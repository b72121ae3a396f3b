"""Spans leave the process redacted: an exporter wrapper masks PII and secrets.

Exception events carry upstream error text, and instrumentations record URLs; any of them
may hold an e-mail address, a card number or a key. Masking at export runs in the batch
processor's thread, so the request path pays nothing for it, and it covers every span
(ours and the instrumentations') whatever set the attribute. A span's route (its own
`flywheel.route`, else its trace's server span's) picks the redactor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import Status

from app.observability.redact import Redactor, Redactors


def _attributes(redactor: Redactor, attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in (attributes or {}).items():
        if isinstance(value, str):
            value = redactor.text(value)
        elif isinstance(value, tuple | list) and any(isinstance(v, str) for v in value):
            value = tuple(redactor.text(v) if isinstance(v, str) else v for v in value)
        out[name] = value
    return out


def redacted(span: ReadableSpan, redactor: Redactor) -> ReadableSpan:
    status = span.status
    if status.description:
        status = Status(status.status_code, redactor.text(status.description))
    events = [
        Event(e.name, _attributes(redactor, e.attributes), timestamp=e.timestamp)
        for e in span.events
    ]
    return ReadableSpan(
        name=redactor.text(span.name),
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=_attributes(redactor, span.attributes),
        events=events,
        links=span.links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def _route(span: ReadableSpan) -> str | None:
    route = (span.attributes or {}).get("flywheel.route")
    return route if isinstance(route, str) else None


def _trace_id(span: ReadableSpan) -> int:
    return span.context.trace_id if span.context is not None else 0


class RedactingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, redactors: Redactors) -> None:
        self.inner = inner
        self._redactors = redactors

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # Child spans (auth, cache, upstream HTTP) take the route their trace's spans name.
        own = [_route(span) for span in spans]
        by_trace: dict[int, str] = {}
        for span, route in zip(spans, own, strict=True):
            if route is not None:
                by_trace.setdefault(_trace_id(span), route)
        out = [
            redacted(span, self._redactors.of(route or by_trace.get(_trace_id(span))))
            for span, route in zip(spans, own, strict=True)
        ]
        return self.inner.export(out)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
