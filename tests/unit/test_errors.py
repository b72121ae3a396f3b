"""Errors: OpenAI's shape, status mapping, and secrets cut from upstream messages."""

from __future__ import annotations

import pytest

from app.errors import UpstreamStatusError, sanitise, validation_error


@pytest.mark.parametrize(
    "leak",
    [
        "sk-proj-abcdefghijklmnop1234",
        "AIzaSyA1234567890abcdefghijkl",
        "gsk_abcdefgh12345678",
        "Bearer eyJhbGciOi.abc.def",
    ],
)
def test_sanitise_cuts_credentials(leak: str) -> None:
    assert leak not in sanitise(f"Incorrect API key provided: {leak}. See docs.")


def test_sanitise_cuts_the_known_secret_and_key_params() -> None:
    out = sanitise("GET /x?key=AAAA&alt=sse with mysecretvalue", "mysecretvalue")
    assert "AAAA" not in out
    assert "mysecretvalue" not in out


@pytest.mark.parametrize(
    ("upstream", "status", "type_"),
    [
        (400, 400, "invalid_request_error"),
        (401, 401, "authentication_error"),
        (429, 429, "rate_limit_error"),
        (500, 502, "upstream_error"),
        (503, 502, "upstream_error"),
    ],
)
def test_upstream_status_mapping(upstream: int, status: int, type_: str) -> None:
    err = UpstreamStatusError(upstream, "boom", retry_after=2.2)
    assert err.status == status
    assert err.body()["error"]["type"] == type_
    assert err.headers["Retry-After"] == "2"


def test_validation_error_names_the_param() -> None:
    err = validation_error([{"loc": ("body", "messages", 0, "content"), "msg": "Field required"}])
    assert err.status == 400
    assert err.param == "messages.0.content"
    assert err.body()["error"]["message"].startswith("messages.0.content")
