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


class RedactingExporter(SpanExporter):
    def __init__(self, inner: SpanExporter, redactors: Redactors) -> None:
        self.inner = inner
        self._redactors = redactors

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # Child spans (auth, cache, upstream HTTP) take the route their trace's spans name.
        routes: dict[int, str] = {}
        for span in spans:
            route = (span.attributes or {}).get("flywheel.route")
            if isinstance(route, str) and span.context is not None:
                routes.setdefault(span.context.trace_id, route)
        out = []
        for span in spans:
            route = (span.attributes or {}).get("flywheel.route")
            if not isinstance(route, str) and span.context is not None:
                route = routes.get(span.context.trace_id)
            redactor = self._redactors.of(route if isinstance(route, str) else None)
            out.append(redacted(span, redactor))
        return self.inner.export(out)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
