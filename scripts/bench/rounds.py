"""Two sides of one comparison measured in alternating short rounds (a-b, b-a, ...), so
drift on a shared machine cancels out; the added latency is the median of the rounds'
differences. Used by the auth+limits and LangSmith scenarios."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

from bench.wrk import WrkResult

ROUNDS = 4  # even: each side goes first as often as second
# A JSON route with prices (so budgets are charged a real cost), on the nginx upstream.
PRICED_ROUTE = """\
routes:
  {name}:
    strategy: priority
    deployments:
      - {{{{name: nginx-json, provider: openai_compatible, model: gpt-4o-mini,
          api_base: "http://127.0.0.1:{{port}}/v1",
          input_cost_per_1k: 0.00015, output_cost_per_1k: 0.0006}}}}
"""


def priced_routes(name: str) -> str:
    """A routes template (`{port}` left to fill) with one priced JSON route `name`."""
    return PRICED_ROUTE.format(name=name)


def alternate(
    sides: Sequence[str], one_round: Callable[[str, int], WrkResult]
) -> dict[str, list[WrkResult]]:
    """`one_round(side, n)` for each side in each of `ROUNDS` rounds, the order flipping."""
    results: dict[str, list[WrkResult]] = {side: [] for side in sides}
    for n in range(ROUNDS):
        for side in sides if n % 2 == 0 else sides[::-1]:
            results[side].append(one_round(side, n))
    return results


def added(results: dict[str, list[WrkResult]], base: str, other: str) -> dict[str, float]:
    """`added_p50_ms`, `added_p99_ms`: the median over rounds of other minus base."""
    pairs = list(zip(results[base], results[other], strict=True))
    return {
        f"added_{p}_ms": statistics.median(
            getattr(o, f"{p}_ms") - getattr(b, f"{p}_ms") for b, o in pairs
        )
        for p in ("p50", "p99")
    }
