"""Schema-driven fuzzing (schemathesis) of the gateway against its own OpenAPI document.

The gateway runs in a thread of its own (schemathesis's pytest integration is
synchronous, so it cannot share the session's event loop), on loopback, with a database
and a Redis prefix of its own: the fuzzer creates keys, variants, experiments and
files, and revokes and deletes them, and none of that may leak into other tests. Its
routes lead only to healthy upstreams (the fake OpenAI under a normal model name, and
the mock provider), so any 5xx is the gateway's own bug. Calls carry the master key,
so they get past authentication and reach every endpoint.

Every operation gets schemathesis's examples, coverage and fuzzing phases, positive and
negative, with a bounded number of examples, derandomized so a failure reproduces.
Checks: no 5xx, no hang (a request timeout), status, content type and body as the
schema declares them, and every error OpenAI-shaped.

Left out, because they are slow without a worker (API tests run none): POST
/admin/snapshots and POST /admin/snapshots/{id}/restore enqueue a job and wait up to
`wait_s` (10 s unless told) for its result. The other admin actions stay in: with the
gateway's own database and prefix, purging its cache or triggering a cycle run (which
only enqueues a job on its own queue, which no worker reads) harms nothing.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis import Case, CheckContext
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from app.main import create_app
from app.routing.config import RoutesFile
from tests.conftest import openai_route, routes_for
from tests.fakes.openai_fake import openai_fake
from tests.fakes.server import FakeServer

MASTER = "fw-master-fuzz-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {MASTER}"}
REQUEST_TIMEOUT_S = 10.0
MAX_EXAMPLES = 25
# The routes the gateway serves: clients name them as `model`.
MODELS = ["gpt-fake", "demo"]
SLOW = [("POST", "/admin/snapshots"), ("POST", "/admin/snapshots/{snapshot_id}/restore")]


class ThreadServed:
    """A `create_app` instance served by uvicorn on a loopback port, in a thread and
    event loop of its own."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        )
        self._thread = threading.Thread(target=self._run, name="fuzz-gateway", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as e:  # raised again by __enter__ (start-up) or __exit__
            self._error = e

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    def __enter__(self) -> ThreadServed:
        self._thread.start()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the gateway did not start") from self._error
            self._thread.join(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)
        assert not self._thread.is_alive(), "the gateway did not stop"
        if self._error is not None:
            raise self._error


def _routes(upstream: str) -> RoutesFile:
    mock = {"latency_ms": 1, "jitter_ms": 1, "seed": 7}
    return routes_for(
        **{
            "gpt-fake": openai_route(upstream),
            "demo": {
                "deployments": [
                    {"name": "mock-a", "provider": "mock", "model": "mock-a", "mock": mock}
                ]
            },
        }
    )


def _settings(**values: Any) -> Settings:
    return Settings(  # type: ignore[call-arg]
        _env_file=None,
        flywheel_master_key=MASTER,
        flywheel_auth="required",
        openai_api_key="sk-test-secret-0123456789",
        # The per-key limit (100 chat requests a minute) would turn most cases into 429s.
        flywheel_http_limit_chat="100000/minute",
        flywheel_http_limit_embeddings="100000/minute",
        **values,
    )


@pytest.fixture(scope="module")
def fuzz_gateway(
    redis_url: str,
    key_prefix: str,
    own_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ThreadServed]:
    settings = _settings(
        redis_url=redis_url,
        database_url=own_database,
        # Under the session's prefix: its keys are deleted with the session's.
        flywheel_redis_prefix=f"{key_prefix}fuzz:",
        flywheel_var_dir=tmp_path_factory.mktemp("fuzzvar"),
    )
    # A fake of its own: the session's keeps what it was sent, for other tests to read.
    upstream: FakeServer
    with openai_fake() as upstream, ThreadServed(create_app(settings, _routes(upstream.url))) as gw:
        yield gw


def _document() -> dict[str, Any]:
    """The gateway's OpenAPI document, built without serving: nothing in it depends on
    the process's state, and `test_the_served_document_is_the_fuzzed_one` checks that
    the running gateway serves this very document. Built at import because schemathesis
    parametrizes by operation at collection (its fixture-based loader, which would load
    it from the running gateway, does not work with pytest 9.2)."""
    return create_app(_settings(), _routes("http://127.0.0.1:9")).openapi()


def _served_models(document: dict[str, Any]) -> dict[str, Any]:
    """The document with `model` in the request bodies narrowed to the served routes:
    a free string would almost never name one, leaving the upstream path unfuzzed (the
    negative phase still sends every other kind of wrong model)."""
    document = copy.deepcopy(document)
    components = document["components"]["schemas"]
    for name in ("ChatCompletionRequest", "EmbeddingRequest"):
        components[name]["properties"]["model"] = {"type": "string", "enum": MODELS}
    return document


DOCUMENT = _document()
CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20240601,
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            "database": "none",
            # NUL characters in strings, paths and queries too.
            "allow-x00": True,
        },
    }
)
schema = schemathesis.openapi.from_dict(_served_models(DOCUMENT), config=CONFIG)
for _method, _path in SLOW:
    schema = schema.exclude(method=_method, path=_path)


def openai_error_shape(ctx: CheckContext, response: Any, case: Case) -> bool | None:
    """Every error is `{"error": {"message", "type", "param", "code"}}`, with a request id."""
    if response.status_code < 400:
        return None
    assert response.headers.get("x-request-id"), "no x-request-id on an error"
    body = response.json()
    assert isinstance(body, dict), f"error body is not an object: {response.text[:200]}"
    assert set(body) == {"error"}, f"not OpenAI-shaped: {response.text[:200]}"
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, response.text[:200]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    return True


CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    openai_error_shape,
]


# (operation, status class) of every case sent, to check what the fuzzing reached.
SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    """One for the module: keep-alive connections make the fuzzing twice as fast."""
    with requests.Session() as s:
        yield s


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_gateway_conforms_to_its_schema(
    case: Case, fuzz_gateway: ThreadServed, session: requests.Session
) -> None:
    response = case.call(
        base_url=fuzz_gateway.url, session=session, headers=AUTH, timeout=REQUEST_TIMEOUT_S
    )
    SEEN[(case.operation.label, response.status_code // 100)] += 1
    case.validate_response(response, checks=CHECKS)


def test_the_fuzzing_reached_the_upstreams() -> None:
    """Cases were both served (through the fake OpenAI and the mock) and refused."""
    if not SEEN:
        pytest.skip("the fuzzing did not run")
    for label in ("POST /v1/chat/completions", "POST /v1/embeddings"):
        assert SEEN[(label, 2)] > 0, SEEN
        assert SEEN[(label, 4)] > 0, SEEN


def test_the_served_document_is_the_fuzzed_one(fuzz_gateway: ThreadServed) -> None:
    resp = requests.get(f"{fuzz_gateway.url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert resp.status_code == 200
    assert resp.json() == DOCUMENT


def test_the_gateway_still_answers(fuzz_gateway: ThreadServed) -> None:
    """After the fuzzing, a plain request is served as usual."""
    resp = requests.post(
        f"{fuzz_gateway.url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hi"}]},
        headers=AUTH,
        timeout=REQUEST_TIMEOUT_S,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["role"] == "assistant"
