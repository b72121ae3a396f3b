"""The FastAPI application: `create_app(settings)` and its lifespan.

`uvicorn app.main:app` builds the app from the environment on first access of `app`
(a module `__getattr__`), so importing this module has no side effects.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.trace.export import SpanExporter

from app.api import (
    admin,
    alerts,
    batches,
    chat,
    cycle,
    dashboard,
    datasets,
    embeddings,
    experiments,
    feedback,
    files,
    health,
    keys,
    metrics,
    models,
    requests_log,
    routes_admin,
)
from app.api.fastpath import Gateway
from app.api.middleware import RequestGuard, RequestIdMiddleware
from app.config import Settings, pii_kinds
from app.errors import install_error_handlers
from app.observability.redact import Redactors
from app.observability.tracing import make_tracing
from app.routing.config import RoutesFile, load_routes
from app.runtime import open_state
from app.schemas.chat import ChatCompletionRequest
from app.schemas.embeddings import EmbeddingRequest

log = logging.getLogger("flywheel")
GC_YOUNG_THRESHOLD = 10_000

VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings

    def in_flight() -> int:
        return app.in_flight if isinstance(app, Gateway) else 0

    async with open_state(
        settings, app.state.routes, app.state.redactors, app.state.tracing, in_flight=in_flight
    ) as state:
        app.state.flywheel = state
        # Objects alive after start-up live for the whole process: freezing them keeps
        # the collector from re-scanning them, which keeps GC pauses off the latency
        # tail. A request allocates a few hundred containers, so the default
        # young-generation threshold (700) ran a collection every request or two; at
        # 10,000 the gateway spent ~8% less CPU per request in `make bench` A/B runs,
        # for a few MB more heap.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        log.info(
            "flywheel ready: %d routes, env=%s", len(state.routes.routes), settings.flywheel_env
        )
        yield


# Every error the gateway answers with (app.errors), whatever its status.
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}


def _document_errors(schema: dict[str, Any], components: dict[str, Any]) -> None:
    """FastAPI documents a 422 with its own `detail` body for validation errors, which
    the gateway never sends (they are 400s, app.errors): every operation documents
    instead that its errors, at any status, are OpenAI-shaped."""
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["ErrorResponse"] = ERROR_SCHEMA
    error = {
        "description": "An error, OpenAI-shaped (400 for bad input, 401, 403, 404, 413, "
        "429, 502/503/504 for upstream trouble)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["default"] = error


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, EmbeddingRequest):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        _document_errors(schema, components)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(
    settings: Settings | None = None,
    routes: RoutesFile | None = None,
    span_exporter: SpanExporter | None = None,
) -> FastAPI:
    """The app. `span_exporter` turns tracing on with that exporter (tests); otherwise
    it is on when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    settings = settings or Settings()
    # No trailing-slash redirects: Starlette builds their Location from the Host header,
    # and a path is served as spelled or not at all.
    app = Gateway(title="Flywheel", version=VERSION, lifespan=lifespan, redirect_slashes=False)
    app.state.settings = settings
    # Loaded here, not in the lifespan, so a bad routes file fails before serving.
    app.state.routes = routes = routes or load_routes(settings)
    app.state.redactors = redactors = Redactors(
        pii_kinds(settings.flywheel_redact_pii),
        {name: route.redact for name, route in routes.routes.items()},
    )
    tracing = make_tracing(
        settings.otel_service_name, settings.otel_exporter_otlp_endpoint, span_exporter, redactors
    )
    app.state.tracing = tracing
    if tracing.provider is not None:
        # The FastAPI-routed endpoints; the fast path makes its own server span.
        FastAPIInstrumentor.instrument_app(app, tracer_provider=tracing.provider)
    install_error_handlers(app)
    for module in (
        chat,
        embeddings,
        feedback,
        models,
        health,
        admin,
        alerts,
        keys,
        metrics,
        cycle,
        experiments,
        datasets,
        batches,
        files,
        dashboard,
        requests_log,
        routes_admin,
    ):
        app.include_router(module.router)
    # Added first, so inside the request ids: its refusals carry one too.
    app.add_middleware(
        RequestGuard, max_body=settings.flywheel_max_body_bytes, exempt=frozenset({"/v1/files"})
    )
    app.add_middleware(RequestIdMiddleware)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> Any:
    if name == "app":
        from app.observability.logging import configure_logging

        settings = Settings()
        configure_logging(settings.flywheel_log_level, json=settings.flywheel_env != "dev")
        return create_app(settings)
    raise AttributeError(name)
