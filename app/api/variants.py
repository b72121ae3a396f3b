"""A route's prompt variant on a chat request: which arm it gets, and the request it sends.

The arm is chosen once per request, as soon as its route is known (before the early L1
check for routes that allow it), and noted on the exchange: its record's `variant` and
the `x-flywheel-variant` header. Routes without a plan pay one dict lookup.

The cache key is the client's body plus the arm's fingerprint (its name and a hash of
its prompt and params), which together determine the request sent upstream exactly.
Keying on the client's body rather than the sent one keeps the early L1 check sound:
a hit there is served before validation, which is right only because every field of
the key was validated when the answer was filled; the fields a variant overwrites would
otherwise escape that.

The request sent is what the route's stored bodies and LangSmith runs carry. An ensemble
route's own plan applies to every member's call (the members' plans do not); a fallback
route answers the request as the requested route's variant shaped it.
"""

from __future__ import annotations

from typing import Any

from app.api.exchange import Exchange
from app.cycle.variants import PROMPT_ROLES, VariantArm, choose
from app.schemas.chat import ChatCompletionRequest, SystemMessage
from app.state import AppState


def pick(
    state: AppState, exchange: Exchange, route: str, body: dict[str, Any]
) -> VariantArm | None:
    """The arm of the route's plan for this request (None: no plan, nothing changes).
    Sticky per `user` when the client names one, else drawn per request."""
    plan = state.variants.plans.get(route)
    if plan is None:
        return None
    user = body.get("user")
    sticky = f"{route}\x00{user}" if isinstance(user, str) and user else None
    arm = choose(plan, sticky, state.variants.rng)
    exchange.variant = arm.variant
    return arm


def sent_request(
    arm: VariantArm, sent: dict[str, Any], chat: ChatCompletionRequest
) -> ChatCompletionRequest:
    """The validated request for `sent` (= `apply(arm, body)`), from the client's
    validated `chat` without validating again: validation costs ~1 µs a message (45 µs
    for a 50-message conversation), this ~5 µs whatever the length. Nothing needs
    checking: the prompt is a string, and the params were checked against the schema's
    ranges when the plan was parsed."""
    update: dict[str, Any] = {
        name: sent[name] for name in (*arm.params, "max_completion_tokens") if name in sent
    }
    if arm.system_prompt is not None:
        update["messages"] = _messages(chat, arm.system_prompt)
    return chat.model_copy(update=update)


def _messages(chat: ChatCompletionRequest, prompt: str) -> list[Any]:
    # The same message `apply` chose: validated messages match the body's one to one.
    messages = list(chat.messages)
    for i, message in enumerate(messages):
        if message.role in PROMPT_ROLES:
            messages[i] = message.model_copy(update={"content": prompt})
            return messages
    return [SystemMessage(role="system", content=prompt), *messages]
