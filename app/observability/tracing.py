"""OpenTelemetry tracing: our spans, W3C context in and out, OTLP export off the path.

Tracing is on when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over http/protobuf) or a
test hands the app an exporter; otherwise every span here is a shared no-op object and
nothing is instrumented, so it costs nothing. When on, spans go to a BatchSpanProcessor:
a bounded queue (`QUEUE`) drained by its own thread in batches, so exporting is never on
the request path, and a collector that is slow or down only drops spans.

The provider belongs to the app (several apps in one test process must not share one);
FastAPI's and aiohttp's instrumentations are given it explicitly rather than through the
global provider. The W3C `traceparent` of incoming requests is honoured, and the upstream
HTTP client injects ours.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

import aiohttp
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.aiohttp_client import create_trace_config
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from app.observability.redact import Redactors
from app.observability.span_redaction import RedactingExporter

QUEUE = 4096
BATCH = 512
DELAY_MS = 1000
PROPAGATOR = TraceContextTextMapPropagator()
NO_SPAN: Span = NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)  # every span, tracing off
_NULL = contextlib.nullcontext(NO_SPAN)


class _HeaderGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier.keys())


_GETTER = _HeaderGetter()


class Tracing:
    def __init__(self, service: str, exporter: SpanExporter | None) -> None:
        self.enabled = exporter is not None
        self.provider: TracerProvider | None = None
        if exporter is None:
            self.tracer: trace.Tracer = trace.NoOpTracer()
            return
        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=QUEUE,
                max_export_batch_size=BATCH,
                schedule_delay_millis=DELAY_MS,
            )
        )
        self.tracer = self.provider.get_tracer("flywheel")

    def span(
        self,
        name: str,
        attributes: Mapping[str, Any] | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
    ) -> AbstractContextManager[Span]:
        """A child of the current span; when tracing is off, a shared no-op span (no
        generator, no allocation: this is on every request's path)."""
        if not self.enabled:
            return _NULL
        return self.tracer.start_as_current_span(
            name, kind=kind, attributes=_clean(attributes), record_exception=True
        )

    def open_span(
        self, name: str, parent: Span | None, attributes: Mapping[str, Any] | None = None
    ) -> Span:
        """A child of `parent` that is not made current, for work that outlives the
        block it starts in (a stream's body runs across yields, where attaching a
        context and detaching it again is not safe); the caller ends it."""
        if not self.enabled or parent is None:
            return NO_SPAN
        ctx = trace.set_span_in_context(parent)
        return self.tracer.start_span(name, context=ctx, attributes=_clean(attributes))

    def job_span(
        self, name: str, parent: otel_context.Context | None, attempt: int
    ) -> AbstractContextManager[Span]:
        """A worker job's span: in the trace of the request that enqueued it, if any."""
        if not self.enabled:
            return _NULL
        return self.tracer.start_as_current_span(
            name,
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={"flywheel.job.attempt": attempt},
            record_exception=True,
        )

    def server_span(self, name: str, headers: Mapping[str, str]) -> AbstractContextManager[Span]:
        """The request's span, a child of the caller's `traceparent` when it sent one."""
        if not self.enabled:
            return _NULL
        return self._server_span(name, headers)

    @contextlib.contextmanager
    def _server_span(self, name: str, headers: Mapping[str, str]) -> Iterator[Span]:
        parent = PROPAGATOR.extract(headers, getter=_GETTER)
        token = otel_context.attach(parent)
        try:
            with self.tracer.start_as_current_span(
                name, kind=SpanKind.SERVER, record_exception=True
            ) as span:
                yield span
        finally:
            otel_context.detach(token)

    def current_span(self) -> Span | None:
        """The span now current, when tracing is on (an exchange sets its attributes once
        the answer is known); None when off."""
        return trace.get_current_span() if self.enabled else None

    def client_trace_configs(self) -> list[aiohttp.TraceConfig]:
        """For the upstream session: a client span per upstream request, and our
        `traceparent` on it. None when tracing is off (no hooks at all)."""
        if self.provider is None:
            return []
        return [create_trace_config(tracer_provider=self.provider)]

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what is queued, within the exporter's timeout


def set_attributes(span: Span, attributes: Mapping[str, Any]) -> None:
    if span.is_recording():
        span.set_attributes(_clean(attributes) or {})


def mark_error(span: Span, status: int, error_type: str | None) -> None:
    if span.is_recording() and status >= 500:
        span.set_status(Status(StatusCode.ERROR, error_type or str(status)))


# The keyword argument a job enqueued for a request carries its trace context in.
TRACEPARENT = "traceparent"


def traceparent() -> str | None:
    """The current span's context as a W3C `traceparent`, for work done elsewhere later
    (the request record, consumed by a worker)."""
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_of(parent: str | None) -> otel_context.Context | None:
    if not parent:
        return None
    return PROPAGATOR.extract({"traceparent": parent}, getter=_GETTER)


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not attributes:
        return None
    return {k: v for k, v in attributes.items() if v is not None}


def make_tracing(
    service: str,
    otlp_endpoint: str | None,
    exporter: SpanExporter | None,
    redactors: Redactors | None = None,
) -> Tracing:
    """Tracing for a process: the exporter given (tests), else OTLP over http/protobuf to
    `OTEL_EXPORTER_OTLP_ENDPOINT` when set, else off. Spans are redacted as exported."""
    if exporter is None and otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces", timeout=5)
    if exporter is not None:
        exporter = RedactingExporter(exporter, redactors or Redactors())
    return Tracing(service, exporter)
