"""Steering a `steerable` mock deployment from the request's metadata (demos, drills)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from app.errors import InvalidRequestError
from app.providers.mock import MockProvider, steered
from app.routing.config import MockParams
from tests.unit.test_mock_provider import BODY, call


def with_meta(meta: dict[str, str]) -> dict[str, Any]:
    return {**BODY, "metadata": meta}


GOOD = '[mock-1] A considered answer to "hi": the short version is yes, with the details depending on your context.'  # noqa: E501


async def kinds(p: MockProvider, body: dict[str, Any], n: int = 60, **mock: Any) -> Counter[str]:
    """How many of n answers came out good and how many degraded."""
    out: Counter[str] = Counter()
    for _ in range(n):
        result = await p.complete(call(body, quality=1.0, seed=3, **mock))
        out["good" if result["choices"][0]["message"]["content"] == GOOD else "bad"] += 1
    return out


async def test_metadata_degrades_only_a_steerable_deployment_it_names() -> None:
    degrade = with_meta({"mock.m.quality": "0", "unrelated": "x"})
    steer = await kinds(MockProvider(), degrade, steerable=True)
    assert steer["bad"] == 60  # every answer degraded
    assert (await kinds(MockProvider(), degrade))["good"] == 60  # not steerable: ignored
    other = with_meta({"mock.someone-else.quality": "0"})
    assert (await kinds(MockProvider(), other, steerable=True))["good"] == 60
    assert (await kinds(MockProvider(), BODY, steerable=True))["good"] == 60


def test_steered_params_replace_only_the_fields_named() -> None:
    c = call(with_meta({"mock.m.latency_ms": "250", "mock.m.error_rate": "0.5"}), steerable=True)
    params = steered(c)
    assert (params.latency_ms, params.error_rate, params.quality) == (250.0, 0.5, 0.95)
    assert params == MockParams(latency_ms=250, jitter_ms=0, error_rate=0.5, steerable=True)


@pytest.mark.parametrize(
    "meta",
    [{"mock.m.quality": "2"}, {"mock.m.quality": "high"}, {"mock.m.seed": "4"}],
)
def test_values_out_of_range_or_fields_not_steerable_are_400(meta: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError) as e:
        steered(call(with_meta(meta), steerable=True))
    assert e.value.status == 400
    assert e.value.param == "metadata"
