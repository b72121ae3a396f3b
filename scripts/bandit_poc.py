"""Why the routing bandit is Thompson sampling: a seeded comparison with ε-greedy and UCB1.

Every algorithm routes the same simulated worlds (tests/sim/world.py: the real Router,
evidence buckets on a simulated clock, weights recomputed every 100 requests): three
deployments of true quality 0.80/0.95/0.97 at $0.0002/$0.001/$0.005 a request under each
FLYWHEEL_POLICY, and a drift world (quality_optimized) where the best drops from 0.97 to
0.80 after 1,000 requests. Reported, averaged over the seeds:

- share: traffic answered by the best deployment over the last 500 of 2,000 requests
  (in the drift world, the best after the drop); min: the worst seed's share;
- weight: the best deployment's routing weight after 2,000 requests;
- regret: sum of (best true reward - true reward of the deployment that answered);
- recovery: requests after the drop until the fallen deployment's weight is below the new
  best's (drift world only).

    .venv/bin/python scripts/bandit_poc.py [--seeds 20] [--scores bernoulli|graded|both]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.sim is not installed

from app.config import Policy
from app.cycle.bandit import ArmEvidence, BanditConfig, DriftRule, reward
from tests.sim.world import Chooser, Scores, World, truths

COSTS = (0.0002, 0.001, 0.005)
REQUESTS = 2000
DROP_AT = 1000
POLICIES: tuple[Policy, ...] = ("cost_optimized", "balanced", "quality_optimized")


def _estimate(s: ArmEvidence, config: BanditConfig) -> float | None:
    q = s.long_run.quality
    if q is None:
        return None
    return reward(
        q,
        s.long_run.cost_per_request,
        s.long_run.p95_latency_ms,
        policy=config.policy,
        latency_budget_ms=config.latency_budget_ms,
    )


def eps_greedy(arms: Sequence[ArmEvidence], config: BanditConfig) -> Mapping[str, float]:
    """The best empirical reward takes all but ε, which the others share: the same
    exploration floor as the bandit's (untried arms count as best)."""
    est = {a.name: _estimate(a, config) for a in arms}
    best = max(est, key=lambda n: math.inf if (e := est[n]) is None else e)
    floor = config.exploration / (len(arms) - 1)
    return {n: 1.0 - config.exploration if n == best else floor for n in est}


def ucb1(arms: Sequence[ArmEvidence], config: BanditConfig) -> Mapping[str, float]:
    """Batch UCB1: the whole next batch to the highest upper confidence bound."""
    total = sum(a.long_run.n_scored for a in arms)

    def index(a: ArmEvidence) -> float:
        est = _estimate(a, config)
        n = a.long_run.n_scored
        if est is None or n <= 0:
            return math.inf
        return est + math.sqrt(2.0 * math.log(max(total, 2.0)) / n)

    best = max(arms, key=index).name
    return {a.name: float(a.name == best) for a in arms}


@dataclass(frozen=True, slots=True)
class Algorithm:
    name: str
    chooser: Chooser | None  # None: the real bandit
    no_drift_rule: bool = False


ALGORITHMS = (
    Algorithm("thompson", None),
    Algorithm("eps_greedy", eps_greedy),
    Algorithm("ucb1", ucb1),
)
NO_DRIFT = Algorithm("thompson, no drift rule", None, no_drift_rule=True)
OFF = DriftRule(z=math.inf, rise_z=math.inf)


@dataclass(frozen=True, slots=True)
class Result:
    share: float
    weight: float
    regret: float
    recovery: float | None


def run_one(algo: Algorithm, policy: Policy, seed: int, scores: Scores, drift: bool) -> Result:
    world = World(
        truths(COSTS),
        policy=policy,
        seed=seed,
        scores=scores,
        chooser=algo.chooser,
        overrides={"drift": OFF} if algo.no_drift_rule else None,
    )
    if not drift:
        world.run(REQUESTS)
        best = world.best()
        return Result(world.share(best, 500), world.weights[-1][best], world.regret, None)
    world.run(DROP_AT)
    fallen = world.best()
    world.change(fallen, quality=0.80)
    world.run(REQUESTS - DROP_AT)
    best = world.best()
    after = world.weights[DROP_AT // world.requests_per_cycle :]
    cycles = next((i + 1 for i, w in enumerate(after) if w[fallen] < w[best]), None)
    recovery = None if cycles is None else cycles * world.requests_per_cycle
    return Result(world.share(best, 500), world.weights[-1][best], world.regret, recovery)


def row(label: str, algo: Algorithm, results: Sequence[Result]) -> str:
    recoveries = [r.recovery for r in results]
    if all(r is None for r in recoveries):
        recovery = "-"
    else:
        known = [r for r in recoveries if r is not None]
        never = len(recoveries) - len(known)
        recovery = f"{statistics.mean(known):.0f}" if known else "never"
        recovery += f" ({never} never)" if never and known else ""
    return (
        f"{label:<20}{algo.name:<25}{statistics.mean(r.share for r in results):>7.2f}"
        f"{min(r.share for r in results):>7.2f}{statistics.mean(r.weight for r in results):>8.2f}"
        f"{statistics.mean(r.regret for r in results):>8.1f}   {recovery}"
    )


def table(scores: Scores, seeds: range) -> None:
    print(f"\n{len(seeds)} seeds, {scores} scores, costs {COSTS} USD/request")
    print(
        f"{'world':<20}{'algorithm':<25}{'share':>7}{'min':>7}{'weight':>8}{'regret':>8}   recovery"
    )
    worlds: list[tuple[str, Policy, bool]] = [(p, p, False) for p in POLICIES]
    worlds.append(("drift (quality_opt)", "quality_optimized", True))
    for label, policy, drift in worlds:
        algos: Sequence[Algorithm] = (*ALGORITHMS, NO_DRIFT) if drift else ALGORITHMS
        for algo in algos:
            results = [run_one(algo, policy, seed, scores, drift) for seed in seeds]
            print(row(label if algo is algos[0] else "", algo, results))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--scores", choices=("bernoulli", "graded", "both"), default="both")
    args = parser.parse_args(argv)
    models: list[Scores] = ["bernoulli", "graded"] if args.scores == "both" else [args.scores]
    started = time.perf_counter()
    for scores in models:
        table(scores, range(args.seeds))
    print(f"({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    main()
