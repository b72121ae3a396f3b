"""One client exchange: its timing, the `x-flywheel-*` headers and its request record."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Span

from app.cycle.rules import ERROR, Expectations, Quality, score_answer
from app.observability.langsmith_runs import LangSmithRuns
from app.observability.redact import Redactor
from app.observability.tracing import mark_error, set_attributes, traceparent
from app.ratelimit.limiter import Limiter
from app.ratelimit.quota import Ticket
from app.routing.config import DeploymentConfig
from app.routing.dispatch import YieldTo
from app.routing.router import Target
from app.store.records import Recorder, RequestRecord

log = logging.getLogger("flywheel.records")
NO_EXPECTATIONS = Expectations()


@dataclass(frozen=True, slots=True)
class BatchTag:
    batch_id: str
    # Awaited before each attempt takes a deployment (the worker's yield to live
    # traffic queued for it): (route, deployment) -> seconds waited.
    yield_to: YieldTo | None = None


@dataclass(slots=True)
class Exchange:
    request_id: str
    endpoint: str
    stream: bool = False
    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    target: Target | None = None
    attempts: int = 0
    upstream_s: float = 0.0
    ttft_s: float | None = None
    route: str | None = None
    cache: str = "bypass"  # hit-l1, hit-l2, miss or bypass
    tenant: str | None = None
    key_id: str | None = None
    variant: str | None = None
    # Set only when the route stores bodies (`bodies: {store: true}`); else never kept.
    body_retention_s: float | None = None
    request_body: Any = None
    response_body: Any = None
    # Admission: the key's reservation, settled with the real usage when recorded, and
    # the `x-ratelimit-*` headers every response of the exchange carries.
    admitted: bool = False
    ticket: Ticket | None = None
    limiter: Limiter | None = None
    rate_headers: dict[str, str] | None = None
    # The request's span, when tracing is on: the record's facts become its attributes,
    # and the record carries its context to the worker that stores it.
    span: Span | None = None
    # With LangSmith on, the exchange (its bodies masked by its route's redactor, in
    # LangSmith's own thread) becomes a run there.
    langsmith: LangSmithRuns | None = None
    redactor: Redactor | None = None
    # The quality rules' inputs: what the request asked for (format, tools, its route's
    # SLO) and the answer (a chat completion, or what a stream gathered of it).
    expect: Expectations = NO_EXPECTATIONS
    answer: dict[str, Any] | None = None
    # The batch whose line this is (a worker runs it): named in the record, and each
    # upstream attempt first waits out live traffic queued for the deployment.
    batch: BatchTag | None = None

    @property
    def yield_to(self) -> YieldTo | None:
        return None if self.batch is None else self.batch.yield_to

    @property
    def wants_whole_text(self) -> bool:
        """Whether the rules read the whole text of the answer (JSON), not its head."""
        return self.expect.json_format is not None

    @property
    def keeps_content(self) -> bool:
        """Whether the answer is kept for the record (stored bodies) or for LangSmith."""
        return self.body_retention_s is not None or (
            self.langsmith is not None and self.langsmith.sends_content
        )

    def count(self) -> None:
        """One more upstream attempt (retries, fallbacks and hedges included)."""
        self.attempts += 1

    def overhead_ms(self) -> float:
        return max(0.0, (time.perf_counter() - self.started - self.upstream_s) * 1000)

    def headers(self) -> dict[str, str]:
        out = {
            "x-flywheel-cache": self.cache,
            "x-flywheel-attempts": str(self.attempts),
            "x-flywheel-overhead-ms": f"{self.overhead_ms():.2f}",
        }
        if self.target is not None:
            out["x-flywheel-route"] = self.target.route
            out["x-flywheel-deployment"] = self.target.deployment.name
        elif self.route is not None:
            out["x-flywheel-route"] = self.route
        if self.variant is not None:
            out["x-flywheel-variant"] = self.variant
        if self.rate_headers:
            out.update(self.rate_headers)
        return out

    def record(
        self,
        recorder: Recorder,
        *,
        status: int,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        error_code: str | None = None,
        error_type: str | None = None,
        disconnected: bool = False,
        usage_estimated: bool = False,
    ) -> None:
        prompt = int((usage or {}).get("prompt_tokens") or 0)
        completion = int((usage or {}).get("completion_tokens") or 0)
        d = self.target.deployment if self.target else None
        cost = 0.0
        if d is not None:
            cost = prompt / 1000 * d.input_cost_per_1k + completion / 1000 * d.output_cost_per_1k
        trace_id = None
        extra: dict[str, Any] = {} if self.batch is None else {"batch_id": self.batch.batch_id}
        if self.span is not None and self.span.is_recording():
            trace_id, parent = self._trace(status, d, prompt, completion, finish_reason, error_type)
            extra["traceparent"] = parent
        self._settle(status, usage, prompt + completion, cost)
        latency_ms = (time.perf_counter() - self.started) * 1000
        quality = self.quality(status, latency_ms)
        rec = RequestRecord(
            request_id=self.request_id,
            endpoint=self.endpoint,
            route=self.target.route if self.target else self.route,
            deployment=d.name if d else None,
            provider=d.provider if d else None,
            model=d.model if d else None,
            status=status,
            stream=self.stream,
            started_at=self.started_wall,
            latency_ms=latency_ms,
            ttft_ms=None if self.ttft_s is None else self.ttft_s * 1000,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost=cost,
            finish_reason=finish_reason,
            error_code=error_code,
            client_disconnected=disconnected,
            usage_estimated=usage_estimated,
            attempts=self.attempts,
            cache=self.cache,
            tenant=self.tenant,
            key_id=self.key_id,
            variant=self.variant,
            error_type=error_type,
            bodies=self._bodies(),
            trace_id=trace_id,
            quality=None if quality is None else quality.score,
            quality_reasons=None if quality is None else list(quality.reasons),
            extra=extra,
        )
        recorder.record(rec)
        if self.langsmith is not None and self.redactor is not None:
            self.langsmith.submit(rec, self.request_body, self.response_body, self.redactor)

    def quality(self, status: int, latency_ms: float) -> Quality | None:
        """The rules' score of what the upstream did; None where it did nothing to judge:
        a request the gateway refused itself (4xx), the client's disconnect (499), a
        failure before any deployment was tried, an endpoint the rules do not cover."""
        if not self.endpoint.startswith("chat"):
            return None
        if status >= 500:
            return ERROR if self.target is not None else None
        if status >= 400 or self.answer is None:
            return None
        try:
            return score_answer(self.answer, self.expect, latency_ms)
        except Exception:  # a scoring bug must never cost the request its record
            log.exception("request %s not scored: the quality rules failed", self.request_id)
            return None

    def _trace(
        self,
        status: int,
        d: DeploymentConfig | None,
        prompt: int,
        completion: int,
        finish_reason: str | None,
        error_type: str | None,
    ) -> tuple[str, str | None]:
        assert self.span is not None
        set_attributes(
            self.span,
            {
                "gen_ai.operation.name": "chat"
                if self.endpoint.startswith("chat")
                else "embeddings",
                "gen_ai.system": d.provider if d else None,
                "gen_ai.request.model": self.route,
                "gen_ai.response.model": d.model if d else None,
                "gen_ai.usage.input_tokens": prompt,
                "gen_ai.usage.output_tokens": completion,
                "gen_ai.response.finish_reasons": [finish_reason] if finish_reason else None,
                "flywheel.route": self.target.route if self.target else self.route,
                "flywheel.deployment": d.name if d else None,
                "flywheel.variant": self.variant,
                "flywheel.cache": self.cache,
                "flywheel.attempts": self.attempts,
                "flywheel.request_id": self.request_id,
                "error.type": error_type,
            },
        )
        mark_error(self.span, status, error_type)
        return format(self.span.get_span_context().trace_id, "032x"), traceparent()

    def _settle(self, status: int, usage: dict[str, Any] | None, tokens: int, cost: float) -> None:
        """Settle the admission's reservation (if any), once, with what the answer used."""
        ticket, limiter = self.ticket, self.limiter
        if ticket is None or limiter is None:
            return
        self.ticket = None
        if usage:
            # An ensemble's answer names no one deployment, so its cost is not known
            # here: the reserved cost stands. A cache hit costs nothing.
            known = self.target is not None or self.cache.startswith("hit")
            limiter.settle(ticket, tokens, cost if known else None)
        elif status >= 400 and status != 499:
            limiter.settle(ticket, 0, 0.0)  # refused or failed: nothing was used
        # A disconnect without usage: what the upstream spent is unknown, so the
        # reservation stands as estimated.

    def keep_bodies(self, retention_s: float | None, request: Any) -> None:
        """Keep this exchange's bodies for its record (the route stores them)."""
        if retention_s is not None:
            self.body_retention_s = retention_s
            self.request_body = request

    def trace_to(self, langsmith: LangSmithRuns, redactor: Redactor, request: Any) -> None:
        """Send this exchange to LangSmith as a run, with its request and answer."""
        self.langsmith = langsmith
        self.redactor = redactor
        self.request_body = request

    def _bodies(self) -> dict[str, Any] | None:
        if self.body_retention_s is None:
            return None
        return {
            "request": self.request_body,
            "response": self.response_body,
            "retention_s": self.body_retention_s,
            "route": self.route,  # whose redaction applies (encode_batch takes it off)
        }
