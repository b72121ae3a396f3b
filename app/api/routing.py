"""Request facts the router needs: the resolved route and the request's deadline."""

from __future__ import annotations

import time
from collections.abc import Mapping

from app.errors import InvalidRequestError
from app.providers.mock import prompt_tokens
from app.routing.router import RequestFacts
from app.schemas.chat import ChatCompletionRequest
from app.state import AppState

DEADLINE_HEADER = "x-flywheel-timeout"
MAX_DEADLINE_S = 3600.0


def resolve_route(state: AppState, chat: ChatCompletionRequest, headers: Mapping[str, str]) -> str:
    """The route asked for (404 if unknown), or the one its conditional rules choose."""
    if not state.router.route(chat.model).rules:
        return chat.model
    facts = RequestFacts(
        prompt_tokens=prompt_tokens(chat), metadata=chat.metadata or {}, headers=headers
    )
    return state.router.resolve(chat.model, facts)


def request_deadline(state: AppState, route: str, headers: Mapping[str, str]) -> tuple[float, bool]:
    """(monotonic deadline, whether the client set it) for every attempt of a request."""
    raw = headers.get(DEADLINE_HEADER)
    if raw is None:
        budget = state.router.route(route).timeout_s or state.settings.flywheel_upstream_timeout_s
        return time.monotonic() + budget, False
    return time.monotonic() + seconds_header(raw, DEADLINE_HEADER, MAX_DEADLINE_S), True


def seconds_header(raw: str, header: str, maximum: float) -> float:
    """A header's number of seconds in (0, maximum], or an OpenAI-shaped 400 naming it."""
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= maximum:
        raise InvalidRequestError(
            f"{header} must be a number of seconds in (0, {maximum:g}]",
            param=header,
            code="invalid_value",
        )
    return seconds
