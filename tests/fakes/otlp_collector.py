"""A fake OpenTelemetry collector: OTLP over http/protobuf (POST /v1/traces), as the
gateway's and worker's exporters send it, decoded into plain span facts."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.fakes.server import FakeServer, FakeState, Seen


@dataclass(frozen=True)
class CollectedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, object]


def collected(state: FakeState) -> list[CollectedSpan]:
    out: list[CollectedSpan] = []
    for seen in state.seen:
        if not isinstance(seen.body, bytes):
            continue
        request = ExportTraceServiceRequest()
        request.ParseFromString(seen.body)
        for resource_spans in request.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes: dict[str, object] = {}
                    for a in span.attributes:
                        kind = a.value.WhichOneof("value")
                        attributes[a.key] = getattr(a.value, kind) if kind else None
                    out.append(
                        CollectedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            attributes,
                        )
                    )
    return out


def make_app(state: FakeState) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        state.seen.append(
            Seen("POST", request.path, dict(request.headers), {}, await request.read())
        )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    return app


def otlp_collector() -> FakeServer:
    return FakeServer(make_app)
