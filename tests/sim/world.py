"""A seeded mock world for the routing bandit: deployments of known truth on a
simulated clock.

Requests are routed by the real `Router` (an `adaptive` route of `mock` deployments,
its `learned_weights` set from each cycle's decision), their outcomes drawn from each
deployment's truth and aggregated into the same `Bucket`s the worker reads from the
database (an error scores 0, as the quality rules score it, and the request fails over to
the next deployment). Every `requests_per_cycle` requests the cycle runs: each arm's
buckets go to the worker's own planning (`app.cycle.engine.plan_route`: the monitor's
budgets and findings, then the bandit), or, for the proof of concept's comparisons, to
another chooser; the weights go back into the router. Detected changes of quality reset
an arm's evidence as in the worker: later runs read its buckets from `Drift.since` on.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from app.config import Policy, Settings
from app.cycle.bandit import ArmEvidence, BanditConfig, RouteDecision, decide, reward
from app.cycle.engine import CycleClock, RouteState, plan_route
from app.cycle.evidence import Bucket
from app.cycle.monitor import Finding
from app.routing.config import RoutesFile, parse_routes
from app.routing.router import Router

ROUTE = "chat"
START = 1_700_000_100.0  # a multiple of the bucket span: buckets line up with cycles
INTERVAL_S = 300.0  # the cycle interval, and the span of a bucket (as in the worker)
LATENCY_SIGMA = 0.3  # log-normal spread: p95 = 1.64 x median
# Graded scores (judge-like): Beta with this concentration, sd ≈ 0.04-0.09 around
# 0.97-0.80. Bernoulli scores (pass/fail rules) are the noisiest a mean can have.
GRADED_CONCENTRATION = 20.0

Scores = Literal["graded", "bernoulli"]
Chooser = Callable[[Sequence[ArmEvidence], BanditConfig], Mapping[str, float]]


@dataclass(frozen=True, slots=True)
class Truth:
    """What a deployment really does (the world knows; the cycle must learn it)."""

    name: str
    quality: float
    cost: float  # USD per request
    latency_ms: float = 400.0  # median
    error_rate: float = 0.0


def truths(costs: Sequence[float], qualities: Sequence[float] = (0.80, 0.95, 0.97)) -> list[Truth]:
    names = ("small", "medium", "large")
    return [
        Truth(name, q, c, latency_ms=300.0 + 300.0 * i)
        for i, (name, q, c) in enumerate(zip(names, qualities, costs, strict=True))
    ]


def routes_file(arms: Sequence[Truth], latency_budget_ms: float | None) -> RoutesFile:
    deployments: list[dict[str, Any]] = [
        {"name": t.name, "provider": "mock", "model": t.name, "mock": {"quality": t.quality}}
        for t in arms
    ]
    cycle = {"latency_budget_ms": latency_budget_ms} if latency_budget_ms else {}
    route = {"strategy": "adaptive", "deployments": deployments, "cycle": cycle}
    return parse_routes({"routes": {ROUTE: route}}, "simulation")


class World:
    def __init__(
        self,
        arms: Sequence[Truth],
        *,
        policy: Policy,
        seed: int,
        scores: Scores = "graded",
        requests_per_cycle: int = 100,
        latency_budget_ms: float | None = 2000.0,
        chooser: Chooser | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        """`overrides`: BanditConfig fields to set over the settings' and route's."""
        self.truth = {t.name: t for t in arms}
        self.scores = scores
        self.requests_per_cycle = requests_per_cycle
        self.chooser = chooser
        routes = routes_file(arms, latency_budget_ms)
        settings = Settings(_env_file=None, flywheel_policy=policy)
        self.half_life_s = settings.flywheel_cycle_half_life_h * 3600.0
        self.config = BanditConfig.for_route(
            settings, routes.routes[ROUTE].cycle, **(overrides or {})
        )
        self.router = Router(routes, settings, random.Random(seed))
        self.routes, self.settings = routes, settings
        self._overrides = overrides
        self.state = RouteState()
        self.findings: list[list[Finding]] = []  # each run's (engine runs only)
        self._outcomes = random.Random(seed * 7919 + 1)
        self._bandit_rng = random.Random(seed * 7919 + 2)
        self.now = START
        self.last_cycle = START
        self.buckets: dict[str, dict[float, Bucket]] = {t.name: {} for t in arms}
        self.reset_at: dict[str, float] = {}
        self.requests = 0
        self.served: list[str] = []  # the deployment whose answer each request got
        self.regret = 0.0
        self.decisions: list[RouteDecision] = []
        self.weights: list[dict[str, float]] = []  # after each cycle

    # -- truth ---------------------------------------------------------------------------

    def true_reward(self, name: str) -> float:
        t = self.truth[name]
        p95 = t.latency_ms * math.exp(1.645 * LATENCY_SIGMA)
        return reward(
            t.quality * (1.0 - t.error_rate),
            t.cost,
            p95,
            policy=self.config.policy,
            latency_budget_ms=self.config.latency_budget_ms,
        )

    def best(self) -> str:
        return max(self.truth, key=self.true_reward)

    def change(self, name: str, **truth: Any) -> None:
        self.truth[name] = replace(self.truth[name], **truth)

    # -- traffic -------------------------------------------------------------------------

    def request(self) -> None:
        best = self.true_reward(self.best())
        for d in self.router.ordered(ROUTE):
            t = self.truth[d.name]
            error = self._outcomes.random() < t.error_rate
            quality = 0.0 if error else self._score(t.quality)
            latency = t.latency_ms * math.exp(self._outcomes.gauss(0.0, LATENCY_SIGMA))
            self._bucket(d.name).add(quality=quality, cost=t.cost, latency_ms=latency, error=error)
            if not error:  # an error fails over to the next deployment, as the gateway does
                self.served.append(d.name)
                self.regret += best - self.true_reward(d.name)
                break
        self.requests += 1
        self.now += INTERVAL_S / self.requests_per_cycle

    def _score(self, q: float) -> float:
        if self.scores == "bernoulli":
            return 1.0 if self._outcomes.random() < q else 0.0
        k = GRADED_CONCENTRATION
        return self._outcomes.betavariate(q * k, (1.0 - q) * k)

    def _bucket(self, name: str) -> Bucket:
        start = math.floor(self.now / INTERVAL_S) * INTERVAL_S
        per_arm = self.buckets[name]
        if start not in per_arm:
            per_arm[start] = Bucket(start)
        return per_arm[start]

    # -- the cycle -----------------------------------------------------------------------

    def evidence(self) -> list[ArmEvidence]:
        return [
            ArmEvidence.from_buckets(
                name,
                [per_arm[s] for s in sorted(per_arm)],
                now=self.now,
                half_life_s=self.half_life_s,
                recent_start=self.last_cycle,
                reset_at=self.reset_at.get(name),
            )
            for name, per_arm in self.buckets.items()
        ]

    def cycle(self) -> dict[str, float]:
        if self.chooser is None and self._overrides is None:
            weights = self._engine_cycle()
        elif self.chooser is not None:
            weights = dict(self.chooser(self.evidence(), self.config))
        else:
            decision = decide(ROUTE, self.evidence(), self.config, self._bandit_rng)
            self.decisions.append(decision)
            self.reset_at.update(decision.resets)
            weights = decision.weights
        self.router.learned_weights[ROUTE] = weights
        self.weights.append(weights)
        self.last_cycle = self.now
        return weights

    def _engine_cycle(self) -> dict[str, float]:
        """A run of the worker's own planning (`app.cycle.engine`): the monitor's budgets
        and findings, the bandit, the evidence resets, carried from run to run."""
        plan = plan_route(
            ROUTE,
            self.routes.routes[ROUTE],
            {n: [b[s] for s in sorted(b)] for n, b in self.buckets.items()},
            {},
            self.state,
            CycleClock(self.now, INTERVAL_S, self.half_life_s),
            self.settings,
            self._bandit_rng,
        )
        assert plan.decision is not None
        self.state = plan.state
        self.reset_at = dict(plan.state.resets)
        self.decisions.append(plan.decision)
        self.findings.append(list(plan.findings))
        return plan.decision.weights

    def run(self, requests: int) -> None:
        """Serve `requests` requests, running the cycle after every `requests_per_cycle`."""
        for _ in range(requests):
            self.request()
            if self.requests % self.requests_per_cycle == 0:
                self.cycle()

    def share(self, name: str, last: int) -> float:
        """The share of the last `last` requests that `name` answered."""
        tail = self.served[-last:]
        return tail.count(name) / len(tail)
