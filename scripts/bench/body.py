"""The chat completion body the bench sends, static or numbered per request."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

PROMPT = "Say hello"
MARKER = "@@N@@"
# What the load's requests present unless told otherwise: a key the gateway does not
# know, served as anonymous where keys are optional (dev).
AUTHORIZATION = "Bearer sk-bench"


@dataclass(frozen=True)
class ChatBody:
    """`{"model", "messages": [user: "Say hello"], "max_tokens": 16}` (+ `"stream": true`).

    With `unique`, each request's prompt gets a number ("Say hello (1.17)"), so a
    response cache cannot serve the load from memory: the bench measures the proxy path.
    """

    model: str
    stream: bool
    unique: bool

    def _render(self, prompt: str) -> str:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16,
        }
        if self.stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":"))

    @property
    def static(self) -> str:
        return self._render(PROMPT)

    def parts(self) -> tuple[str, str] | None:
        """(prefix, suffix) around the request number, or None when not unique."""
        if not self.unique:
            return None
        prefix, suffix = self._render(f"{PROMPT} ({MARKER})").split(MARKER)
        return prefix, suffix

    def numbered(self, n: int) -> str:
        parts = self.parts()
        return self.static if parts is None else f"{parts[0]}{n}{parts[1]}"
