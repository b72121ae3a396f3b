"""PII and secret redaction: applied to anything logged, traced, sent to LangSmith or stored.

Masks e-mail addresses, phone numbers, payment card numbers (only digit runs that pass
the Luhn check, so order numbers and timestamps survive), national ID patterns (US SSN,
UK NINO) and strings shaped like API keys or bearer tokens. Each match becomes a typed
placeholder such as `[EMAIL]`, so a reader still sees what kind of thing was there.
Pure CPU: callers with large payloads run it in a thread.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

# Bounded repeats and a start that cannot be inside a longer local part: an unbounded
# `[...]+@` rescans to the end of the text from every position (minutes on 1 MB).
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}"
    r"(?:\.[A-Za-z0-9-]{1,63}){0,8}\.[A-Za-z]{2,24}\b"
)
# Provider and cloud key shapes (Flywheel's own virtual keys among them: `fw-` and 43
# URL-safe characters), then generic "bearer <token>" and key=value secrets.
_SECRET = re.compile(
    r"\b(?:sk|pk|rk)-(?:[A-Za-z0-9_-]+-)?[A-Za-z0-9_-]{16,}"
    r"|\bfw-[A-Za-z0-9_-]{32,}"
    r"|\bsk-ant-[A-Za-z0-9_-]{16,}"
    r"|\bAKIA[0-9A-Z]{16}\b"
    r"|\bAIza[0-9A-Za-z_-]{35}\b"
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}\b"
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"
    r"|\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
    r"|\blsv2_(?:pt|sk)_[A-Za-z0-9_]{20,}"  # LangSmith
    r"|\bgsk_[A-Za-z0-9]{20,}"  # Groq
    r"|\bhf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|hooks\.slack\.com/services/[A-Za-z0-9/_-]+"  # a webhook URL is its own secret
)
# Credentials in a URL (scheme://user:password@host): the password goes.
_USERINFO = re.compile(r"(?<=://)([^/\s:@]{1,256}):[^/\s@]{1,256}@")
_BEARER = re.compile(
    r"(?i)\b(bearer|token|api[_-]?key|secret|password)(\s*[:=]\s*|\s+)([^\s\"',;]{8,})"
)
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_NINO = re.compile(r"\b[A-CEGHJ-PR-TW-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b")
# Digit groups that are part of a longer run (a card-like number, an id) are not phones.
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?"
    r"\d{2,4}[ .-]\d{3,4}(?:[ .-]?\d{3,4})?(?![ .-]?\d)"
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "[CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group(0)


def _phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group(0))
    return "[PHONE]" if 7 <= digits <= 15 else match.group(0)


Rule = tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]
# Always applied: a key in a prompt or an error is never wanted anywhere.
_SECRETS: tuple[Rule, ...] = (
    (_USERINFO, lambda m: f"{m.group(1)}:[SECRET]@"),
    (_SECRET, "[SECRET]"),
    (_BEARER, lambda m: f"{m.group(1)}{m.group(2)}[SECRET]"),
)
# By kind, in this order: a card number also looks like digit groups (phones last).
_PII: tuple[tuple[str, Rule], ...] = (
    ("email", (_EMAIL, "[EMAIL]")),
    ("card", (_CARD, _card)),
    ("national_id", (_SSN, "[NATIONAL_ID]")),
    ("national_id", (_NINO, "[NATIONAL_ID]")),
    ("phone", (_PHONE, _phone)),
)
PII_KINDS = ("email", "phone", "card", "national_id")


class Redactor:
    """Masks secrets always and the PII kinds it was made with (a route's choice)."""

    __slots__ = ("_rules", "kinds")

    def __init__(self, kinds: Iterable[str] = PII_KINDS) -> None:
        self.kinds = frozenset(kinds)
        unknown = self.kinds - set(PII_KINDS)
        if unknown:
            raise ValueError(f"unknown PII kinds: {sorted(unknown)}")
        self._rules = _SECRETS + tuple(rule for kind, rule in _PII if kind in self.kinds)

    def text(self, text: str) -> str:
        for pattern, replacement in self._rules:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any) -> Any:
        """A copy of a JSON-like value with every string redacted (keys kept as they are)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


class Redactors:
    """Each route's redactor (its `redact:` list), else the process default."""

    __slots__ = ("_routes", "default")

    def __init__(
        self,
        default: Iterable[str] = PII_KINDS,
        routes: Mapping[str, Iterable[str] | None] | None = None,
    ) -> None:
        self.default = Redactor(default)
        self._routes = {n: Redactor(k) for n, k in (routes or {}).items() if k is not None}

    def of(self, route: str | None) -> Redactor:
        if route is None:
            return self.default
        return self._routes.get(route, self.default)


# Everything masked: for text with no route to choose for it (log lines, errors).
FULL = Redactor()


def redact_text(text: str) -> str:
    return FULL.text(text)


def redact(value: Any) -> Any:
    return FULL.value(value)
