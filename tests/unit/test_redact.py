"""PII and secret redaction: what is masked, and what must survive untouched."""

from __future__ import annotations

import pytest

from app.observability.redact import PII_KINDS, Redactor, Redactors, redact, redact_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to john.doe+x@mail.example.co.uk today", "write to [EMAIL] today"),
        ("card 4111 1111 1111 1111 thanks", "card [CARD] thanks"),
        ("card 4111-1111-1111-1111", "card [CARD]"),
        ("ssn 123-45-6789", "ssn [NATIONAL_ID]"),
        ("NI number AB 12 34 56 C", "NI number [NATIONAL_ID]"),
        ("ring +1 415-555-0134", "ring [PHONE]"),
        ("ring (020) 7946 0958", "ring [PHONE]"),
        ("key sk-proj-abcdefghijklmnopqrstuv12", "key [SECRET]"),
        ("sk-ant-api03-abcdefghijklmnopqrstuvwxyz", "[SECRET]"),
        ("aws AKIAIOSFODNN7EXAMPLE", "aws [SECRET]"),
        ("Authorization: Bearer abcdef123456789", "Authorization: Bearer [SECRET]"),
        ("password=hunter2hunter2", "password=[SECRET]"),
        ("ls lsv2_pt_0123456789abcdef0123456789abcdef_01234567", "ls [SECRET]"),
        ("groq gsk_abcdefghijklmnopqrstuvwxyz0123", "groq [SECRET]"),
        ("hf hf_abcdefghijklmnopqrstuvwxyz0123456789", "hf [SECRET]"),
        ("post to https://hooks.slack.com/services/T0/B0/XXXXXXXX", "post to https://[SECRET]"),
        ("db postgres://app:s3cr3tpw@db:5432/x", "db postgres://app:[SECRET]@db:5432/x"),
    ],
)
def test_masks(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 4111 1111 1111 1112",  # fails the Luhn check: not a card
        "at 2026-11-21 12:00:00 UTC",
        "version 1.2.3, pi 3.14159, 1,234.56 dollars",
        "the answer is 42",
        "id chatcmpl-0123456789abcdef",
    ],
)
def test_leaves_ordinary_text_alone(text: str) -> None:
    assert redact_text(text) == text


def test_nested_values_keep_their_shape() -> None:
    value = {"messages": [{"role": "user", "content": "me@x.io"}], "n": 2, "ok": True}
    assert redact(value) == {
        "messages": [{"role": "user", "content": "[EMAIL]"}],
        "n": 2,
        "ok": True,
    }


def test_a_route_chooses_its_pii_kinds_but_never_secrets() -> None:
    text = "mail me@x.io, card 4111 1111 1111 1111, key sk-proj-abcdefghijklmnopqrstuv12"
    only_cards = Redactors(PII_KINDS, {"cards": ["card"], "none": []})
    assert only_cards.of("cards").text(text) == "mail me@x.io, card [CARD], key [SECRET]"
    assert (
        only_cards.of("none").text(text) == "mail me@x.io, card 4111 1111 1111 1111, key [SECRET]"
    )
    assert only_cards.of("other").text(text) == "mail [EMAIL], card [CARD], key [SECRET]"
    with pytest.raises(ValueError, match="unknown PII kinds"):
        Redactor(["emails"])
