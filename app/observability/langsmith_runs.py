"""LangSmith runs: every gateway request as an LLM run, `/v1/feedback` scores as feedback.

On the event loop `submit` and `feedback` only append to a bounded deque (when it is full
the oldest entry goes, counted in `dropped`) and wake one daemon thread. That thread
redacts, builds the runs and hands them to the langsmith `Client` in batches
(`multipart_ingest`: one POST /runs/multipart per batch, or /runs/batch when the server
has no multipart endpoint); feedback goes through `create_feedback` (POST /feedback).

Why our thread and not the client's auto batch tracing: in the installed client that mode
runs non-daemon threads that drain their whole queue, with retries, at interpreter exit (a
hanging LangSmith holds the process for minutes), buffers up to 1 GB of compressed runs
by default and tells nobody what was sent or lost. Driving the same batch endpoint from
one daemon thread bounds memory by our deque, bounds `close`, and gives exact counters; a
hanging LangSmith only stalls that thread, never a request.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from datetime import UTC, datetime, timedelta
from typing import Any

from app.config import Settings
from app.observability.redact import Redactor, redact_text
from app.store.records import RequestRecord

log = logging.getLogger("flywheel.langsmith")

# Fixed forever: /v1/feedback finds a request's run from its id alone, in any replica.
NAMESPACE = uuid.UUID("5b0c7d9e-2f41-5c3a-9e8d-6a1f0b2c3d4e")
DEFAULT_PROJECT = "flywheel"
DEFAULT_ENDPOINT = "https://api.smith.langchain.com"  # the library's own default
BATCH_MAX = 100  # runs per POST (the batch size LangSmith's /info advertises)
LINGER_S = 0.1  # after a wake, let a batch gather rather than POST once per request
FEEDBACK_ATTEMPTS = 3  # POST /feedback retries a 404 (run not ingested yet): ~3 s at most
# Loggers that report each failed batch (quoting part of the API key) from our thread.
_NOISY_LOGGERS = ("langsmith.client", "langsmith.utils", "urllib3.connectionpool")
_RECORD_FACTS = (
    "endpoint", "route", "deployment", "provider", "model", "variant", "cache", "attempts",
    "request_id", "trace_id", "tenant", "cost", "ttft_ms", "latency_ms", "status", "stream",
    "finish_reason",
)  # fmt: skip
_PARAMS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed", "stream")

_Run = tuple[RequestRecord, Any, Any, Redactor]
_Feedback = tuple[str, float, str | None, datetime | None, str]


def run_id(request_id: str) -> uuid.UUID:
    return uuid.uuid5(NAMESPACE, request_id)


class _NotOnThread(logging.Filter):
    """Drops the library's warnings raised on our thread: we log once per outage."""

    ident: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.ident or record.levelno < logging.WARNING


class LangSmithRuns:
    def __init__(self, settings: Settings) -> None:
        assert settings.langsmith_api_key is not None
        self._project = settings.langsmith_project or DEFAULT_PROJECT
        self._content = settings.flywheel_langsmith_content
        self._cap = settings.flywheel_langsmith_queue
        self._runs: deque[_Run] = deque(maxlen=self._cap)
        self._feedback: deque[_Feedback] = deque(maxlen=self._cap)
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._filter = _NotOnThread()
        self._closed = self._troubled = False
        # Counted where it happens (queue full on the loop; what close() gives up), so it
        # never goes backwards the way a difference of two moving counts could.
        self._dropped = 0
        self._seen_dropped = 0
        self._error: Exception | None = None
        self._project_id: uuid.UUID | None = None
        self.sent = self.failures = 0
        # All explicit, so no LANGSMITH_* variable (nor a .env value the process never
        # exported) changes where runs go, what they hide or how many are sampled.
        # Imported here: the library weighs ~28 MB of memory, for gateways that use it.
        from langsmith import Client
        from langsmith.utils import LangSmithRetry

        # One quick retry under the client's own three attempts per batch. Retry-After is
        # not honoured: runs are dropped rather than held (our thread stalled) for minutes.
        retry = LangSmithRetry(
            total=1, backoff_factor=0.5, status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=None, raise_on_status=False, respect_retry_after_header=False,
        )  # fmt: skip
        self._client = Client(
            api_url=(settings.langsmith_endpoint or DEFAULT_ENDPOINT).rstrip("/"),
            api_key=settings.langsmith_api_key.get_secret_value(),
            workspace_id="",
            auto_batch_tracing=False,
            timeout_ms=(3_000, 10_000),  # batch POSTs use the library's own (3 s, 10 s)
            retry_config=retry,
            hide_inputs=False,  # our redaction is the policy; "none" sends no content
            hide_outputs=False,
            hide_metadata=False,
            omit_traced_runtime_info=True,  # else LANGSMITH_* variables ride along
            tracing_mode="langsmith",  # not OTel: OTEL_* belongs to our own tracing
            tracing_sampling_rate=1.0,
            disable_prompt_cache=True,
            tracing_error_callback=self._on_error,
        )

    @property
    def pending(self) -> int:
        return len(self._runs) + len(self._feedback)

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def sends_content(self) -> bool:
        """Whether runs carry the request's messages and answer (masked)."""
        return self._content != "none"

    # --- event loop side: an append and a flag, nothing else ---------------------------
    def submit(self, rec: RequestRecord, request: Any, response: Any, redactor: Redactor) -> None:
        if not self._closed:
            if len(self._runs) == self._runs.maxlen:
                self._dropped += 1  # the oldest goes
            self._runs.append((rec, request, response, redactor))
            if not self._wake.is_set():
                self._wake.set()

    def feedback(
        self,
        request_id: str,
        score: float,
        comment: str | None,
        start_time: datetime | None = None,
        key: str = "user_score",
    ) -> None:
        """`start_time`: the request's, when known (the worker reads it with the score)."""
        if not self._closed:
            if len(self._feedback) == self._feedback.maxlen:
                self._dropped += 1
            self._feedback.append((request_id, score, comment, start_time, key))
            if not self._wake.is_set():
                self._wake.set()

    def start(self) -> None:
        if self._thread is None and not self._closed:
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).addFilter(self._filter)
            self._thread = threading.Thread(target=self._work, name="ls-runs", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued within `timeout`; whatever is left then is dropped."""
        self._closed = True
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if lost := self.pending:
            self._dropped += lost
            self._runs.clear()
            self._feedback.clear()
            log.warning("LangSmith: %d runs/feedback not sent within %.1fs: dropped", lost, timeout)
        if self._thread is None or not self._thread.is_alive():
            self._unfilter()  # else the thread does, when its stuck call ends
        self._client.close(timeout=0)  # the client itself queues nothing

    # --- worker thread -------------------------------------------------------------------
    def _work(self) -> None:
        self._filter.ident = threading.get_ident()
        while True:
            self._wake.wait()
            if len(self._runs) < BATCH_MAX:
                self._stopping.wait(LINGER_S)  # closing skips the wait
            self._wake.clear()
            try:
                self._drain()
            except Exception:  # a bug must not end tracing for good: log, carry on
                log.exception("LangSmith worker failed")
            if self._stopping.is_set() and not self.pending:
                self._unfilter()
                return

    def _unfilter(self) -> None:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(self._filter)

    def _take(self, queue: deque[Any], n: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < n:
            try:
                out.append(queue.popleft())
            except IndexError:
                break
        return out

    def _drain(self) -> None:
        while self.pending:
            if batch := self._take(self._runs, BATCH_MAX):
                self._send_runs(batch)
            # After the runs, so the run a score is for went out before its feedback.
            for item in self._take(self._feedback, self._cap):
                self._send_feedback(*item)

    def _on_error(self, error: Exception) -> None:
        # The client reports a failed send here, synchronously, on this thread.
        self._error = error

    def _send_runs(self, batch: list[_Run]) -> None:
        runs: list[dict[str, Any]] = []
        for item in batch:
            try:
                runs.append(self._build(*item))
            except Exception as e:  # noqa: BLE001 - one odd payload must not sink the batch
                self._settle(1, e)
        if runs:
            self._error = None
            try:
                self._client.multipart_ingest(create=runs)
            except Exception as e:  # noqa: BLE001 - LangSmith trouble is counted, not raised
                self._error = e
            self._settle(len(runs), self._error)

    def _send_feedback(
        self, request_id: str, score: float, comment: str | None, start: datetime | None, key: str
    ) -> None:
        rid = run_id(request_id)
        if comment is not None:
            comment = None if self._content == "none" else redact_text(comment)
        try:
            self._client.create_feedback(
                run_id=rid,
                trace_id=rid,
                key=key,
                score=score,
                comment=comment,
                session_id=self._session_id(),
                start_time=start,
                stop_after_attempt=FEEDBACK_ATTEMPTS,
            )
        except Exception as e:  # noqa: BLE001 - as for runs
            self._settle(1, e)
        else:
            self._settle(1, None)

    def _session_id(self) -> uuid.UUID | None:
        # Feedback names the run's project: LangSmith deprecates feedback without one.
        if self._project_id is None:
            from langsmith import utils as ls_utils

            try:
                self._project_id = self._client.read_project(project_name=self._project).id
            except ls_utils.LangSmithNotFoundError:
                return None  # no run has reached the project yet
        return self._project_id

    def _settle(self, n: int, error: BaseException | None) -> None:
        """Count a send, and log the start and end of trouble once each."""
        if error is None:
            self.sent += n
        else:
            self.failures += n
        dropped = self.dropped
        new_drops, self._seen_dropped = dropped > self._seen_dropped, dropped
        if error is not None or new_drops:
            if not self._troubled:
                self._troubled = True
                why = type(error).__name__ if error is not None else "queue full"
                log.warning("LangSmith runs are being lost (%s) until it keeps up again", why)
        elif self._troubled:
            self._troubled = False
            log.info(
                "LangSmith keeps up again (%d failed, %d dropped so far)", self.failures, dropped
            )

    def _build(
        self, rec: RequestRecord, request: Any, response: Any, red: Redactor
    ) -> dict[str, Any]:
        rid = run_id(rec.request_id)
        start = datetime.fromtimestamp(rec.started_at, UTC)
        inputs: Any
        outputs: dict[str, Any]
        if self._content == "none":
            inputs, outputs = _facts(request), {"finish_reason": rec.finish_reason}
        else:
            inputs = red.value(request if isinstance(request, dict) else {"input": request})
            outputs = _answer(response, red)
        outputs["usage_metadata"] = _usage(rec, response)
        labels = (("route", rec.route), ("deployment", rec.deployment), ("variant", rec.variant))
        run = {
            "id": rid,
            "trace_id": rid,  # a root run is its own trace
            # trace_id and dotted_order are what batch ingestion requires of a run.
            "dotted_order": f"{start:%Y%m%dT%H%M%S%fZ}{rid}",
            "session_name": self._project,
            "name": f"flywheel {rec.route or rec.endpoint}",
            "run_type": "llm",
            "start_time": start,
            "end_time": start + timedelta(milliseconds=rec.latency_ms),
            "inputs": inputs,
            "outputs": outputs,
            "extra": {"metadata": _metadata(rec, request)},
            "tags": ["flywheel", f"cache:{rec.cache}", *(f"{k}:{v}" for k, v in labels if v)],
        }
        if rec.status >= 400 or rec.error_type or rec.error_code:
            # The kind of failure only: upstream error text may quote the prompt.
            kind = " ".join(p for p in (rec.error_type, rec.error_code) if p) or "error"
            run["error"] = f"{kind} (HTTP {rec.status})"
        return run


def _facts(request: Any) -> dict[str, Any]:
    """What a request says without its content: model, sampling parameters, counts."""
    if not isinstance(request, dict):
        return {}
    out = {k: request[k] for k in _PARAMS if isinstance(request.get(k), int | float)}
    if isinstance(request.get("model"), str):
        out["model"] = request["model"]
    for key in ("messages", "input", "tools"):
        if isinstance(request.get(key), list):
            out[f"{key}_count"] = len(request[key])
    return out


def _answer(response: Any, red: Redactor) -> dict[str, Any]:
    if response is None:
        return {}
    if not isinstance(response, dict):
        return {"output": red.value(response)}
    data = response.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and "embedding" in data[0]:
        vector = data[0]["embedding"]  # vectors are bulk, not insight: their shape only
        dims = len(vector) if isinstance(vector, list) else None
        return {"model": response.get("model"), "embeddings": len(data), "dimensions": dims}
    # OpenAI's shape, which LangSmith renders; usage moves to usage_metadata.
    return {k: red.value(v) for k, v in response.items() if k != "usage"}


def _usage(rec: RequestRecord, response: Any) -> dict[str, Any]:
    """LangSmith's UsageMetadata, as its own OpenAI wrapper puts it in a run's outputs."""
    usage: dict[str, Any] = {
        "input_tokens": rec.prompt_tokens,
        "output_tokens": rec.completion_tokens,
        "total_tokens": rec.prompt_tokens + rec.completion_tokens,
    }
    if rec.cost:
        usage["total_cost"] = rec.cost
    upstream = response.get("usage") if isinstance(response, dict) else None
    if isinstance(upstream, dict):
        cached = (upstream.get("prompt_tokens_details") or {}).get("cached_tokens")
        reasoning = (upstream.get("completion_tokens_details") or {}).get("reasoning_tokens")
        if isinstance(cached, int):
            usage["input_token_details"] = {"cache_read": cached}
        if isinstance(reasoning, int):
            usage["output_token_details"] = {"reasoning": reasoning}
    return usage


def _metadata(rec: RequestRecord, request: Any) -> dict[str, Any]:
    params = request if isinstance(request, dict) else {}
    meta: dict[str, Any] = {name: getattr(rec, name) for name in _RECORD_FACTS}
    meta.update(
        usage_estimated=rec.usage_estimated or None,
        client_disconnected=rec.client_disconnected or None,
        # The ls_* keys LangSmith reads for its model and cost views.
        ls_provider=rec.provider,
        ls_model_name=rec.model,
        ls_model_type="chat",
        ls_temperature=params.get("temperature"),
        ls_max_tokens=params.get("max_tokens") or params.get("max_completion_tokens"),
    )
    return {k: v for k, v in meta.items() if v is not None}


def make_langsmith(settings: Settings) -> LangSmithRuns | None:
    """The run sender, started, or None unless LANGSMITH_TRACING is on and a key is set."""
    if not (settings.langsmith_tracing and settings.langsmith_api_key):
        return None
    from langsmith.utils import LangSmithUserError

    try:
        runs = LangSmithRuns(settings)
    except LangSmithUserError as e:  # e.g. LANGSMITH_RUNS_ENDPOINTS beside an endpoint
        log.error("LangSmith tracing off: %s", redact_text(str(e)))
        return None
    runs.start()
    return runs
