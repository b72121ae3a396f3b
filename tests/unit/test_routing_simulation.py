"""Acceptance: the cycle's bandit, fed by simulated traffic through the real Router, finds
the deployment with the best reward under each policy, reacts to drift within two runs
and sends a deployment over its budget to the exploration floor at the next run.

The worlds (tests/sim/world.py): three deployments of true quality 0.80/0.95/0.97 at
$0.0002/$0.001/$0.005 a request, a cycle every 100 requests (5 simulated minutes),
graded (judge-like) scores. Bernoulli scores are the POC's business
(scripts/bandit_poc.py): with a 0.02 quality gap no algorithm settles on the best arm
within 2,000 pass/fail scores.
"""

from __future__ import annotations

import pytest

from app.config import Policy
from app.cycle.bandit import ArmDecision, RouteDecision
from tests.sim.world import Scores, World, truths

COSTS = (0.0002, 0.001, 0.005)
SEEDS = (1, 2, 3, 4, 5)
POLICIES: tuple[Policy, ...] = ("cost_optimized", "balanced", "quality_optimized")
FLOOR = 0.05 / 2  # FLYWHEEL_CYCLE_EXPLORATION shared by the two arms that are not best


def world(policy: Policy, seed: int, scores: Scores = "graded") -> World:
    return World(truths(COSTS), policy=policy, seed=seed, scores=scores)


def arm(decision: RouteDecision, name: str) -> ArmDecision:
    return next(a for a in decision.arms if a.name == name)


def test_the_best_deployment_depends_on_the_policy() -> None:
    best = {p: world(p, 0).best() for p in POLICIES}
    # Cheap-but-worse wins when cost counts, the best quality when quality does.
    assert best["cost_optimized"] == "medium"
    assert best["quality_optimized"] == "large"
    assert best["cost_optimized"] != best["quality_optimized"]
    rewards = {n: world("quality_optimized", 0).true_reward(n) for n in ("medium", "large")}
    assert rewards["large"] > rewards["medium"]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_traffic_converges_on_the_best_reward(policy: Policy, seed: int) -> None:
    w = world(policy, seed)
    w.run(2000)
    best = w.best()
    assert w.decisions[-1].best == best
    assert w.router.learned_weights["chat"][best] >= 0.85  # the routing share now
    assert w.share(best, 400) >= 0.85  # and what the last 400 requests got
    assert all(weight >= FLOOR - 1e-9 for weight in w.weights[-1].values())


@pytest.mark.parametrize("seed", SEEDS)
def test_drift_moves_traffic_within_two_runs(seed: int) -> None:
    w = world("quality_optimized", seed)
    w.run(1000)
    assert w.best() == "large"
    before = w.decisions[-1]
    assert arm(before, "large").weight > arm(before, "medium").weight

    w.change("large", quality=0.80)
    w.run(200)  # two cycle runs
    after = w.decisions[-2:]
    fired = [drift for d in after if (drift := arm(d, "large").drift) is not None]
    assert fired, "the drift detector did not fire"
    assert fired[0].direction == "drop"
    assert fired[0].before > 0.93
    assert fired[0].recent < 0.87
    assert "large" in next(d for d in after if arm(d, "large").drift).drifted
    # The monitor's finding, which the worker raises as an alert (severity high).
    drops = [f for run in w.findings[-2:] for f in run if f.kind == "quality_drop"]
    assert [(f.subject, f.severity) for f in drops] == [("large", "high")]
    # Its weight is under the next best's, and stays there: the evidence from before the
    # drop is not read again at the next run.
    assert arm(after[-1], "large").weight < arm(after[-1], "medium").weight
    w.run(300)
    assert w.best() == "medium"
    assert w.weights[-1]["medium"] > w.weights[-1]["large"]


@pytest.mark.parametrize("seed", SEEDS[:3])
@pytest.mark.parametrize(
    ("regression", "tripped"),
    [({"latency_ms": 5000.0}, "p95_latency"), ({"error_rate": 0.3}, "error_rate")],
)
def test_a_deployment_over_budget_drops_to_the_floor(
    seed: int, regression: dict[str, float], tripped: str
) -> None:
    w = world("balanced", seed)
    w.run(1000)
    assert w.weights[-1]["medium"] > 0.5  # favoured before it regresses
    w.change("medium", **regression)
    w.run(100)  # the next run
    medium = arm(w.decisions[-1], "medium")
    assert medium.guardrail == tripped
    assert medium.weight == pytest.approx(FLOOR)
    assert w.decisions[-1].best == "large"
    # Held there (not flapping back) while the floor's few requests still show it.
    w.run(300)
    assert all(ws["medium"] == pytest.approx(FLOOR) for ws in w.weights[-3:])


def test_a_recovered_deployment_wins_its_traffic_back() -> None:
    w = world("balanced", 1)
    w.run(1000)
    w.change("medium", latency_ms=5000.0)
    w.run(300)
    assert w.weights[-1]["medium"] == pytest.approx(FLOOR)
    w.change("medium", latency_ms=600.0)
    w.run(2500)  # the floor keeps it measured; fresh requests clear the guardrail
    assert w.decisions[-1].best == "medium"
