"""The routes as an operator sees them (master key, read-only): each route's
configuration, its deployments' runtime state, the weights it routes by, and how the
virtuous cycle rated it; one route's figures over time for charts.

Cheap by construction: one database query (two for a route's history with no run in its
window) bounded like the cycle's endpoints (a database that does not answer is a 503),
and one Redis round trip for the weights the cycle published. A Redis that does not
answer leaves the live weights null and the configured ones in force, as the router
itself does; the answer says so in `weights_error`.

Breakers, concurrency and latency are this replica's (`breakers_of: "this replica"`):
each gateway process learns them from its own traffic. No API key, key variable name or
`api_base` is ever shown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from redis.exceptions import RedisError

from app.api.cycle import REDIS_TIMEOUT_S, read_db
from app.deps import AdminDep, StateDep
from app.errors import NotFoundError
from app.routing.config import RouteConfig
from app.routing.weights import weights_key
from app.state import AppState
from app.store.route_history import FIGURES, LatestRun, latest_run, route_history

router = APIRouter(prefix="/admin/routes", tags=["admin"], dependencies=[AdminDep])

BREAKERS_OF = "this replica"
REDIS_DOWN = "redis_unavailable"
# Route → deployment → weight, as the cycle published them; None: Redis did not answer.
LiveWeights = dict[str, dict[str, float]] | None
Runtime = dict[tuple[str, str], dict[str, object]]


@router.get("")
async def list_routes(state: StateDep) -> dict[str, Any]:
    """Every route (ensembles too), in the routes file's order."""
    latest = await read_db("cycle runs", lambda: latest_run(state.engine))
    live = await _live_weights(state, list(state.router.routes))
    runtime = _runtime(state)
    data = [
        _item(state, runtime, name, config, latest, live)
        for name, config in state.router.routes.items()
    ]
    return {
        "object": "list",
        "data": data,
        "breakers_of": BREAKERS_OF,
        "weights_error": REDIS_DOWN if live is None else None,
    }


@router.get("/{name:path}")
async def get_route(
    state: StateDep,
    name: Annotated[str, Path(max_length=200)],
    hours: Annotated[int, Query(ge=1, le=168, description="the history's window")] = 24,
) -> dict[str, Any]:
    """One route, and `history`: a point per completed cycle run started in the last
    `hours` hours, oldest first (at most the newest 1000)."""
    config = state.router.routes.get(name)
    if config is None:
        raise NotFoundError(f"no route {name!r}", param="name", code="route_not_found")
    since = datetime.now(UTC) - timedelta(hours=hours)
    history = await read_db("cycle runs", lambda: route_history(state.engine, name, since))
    # The newest run in the window is the newest of all; only an empty window asks again.
    latest = history.latest or await read_db("cycle runs", lambda: latest_run(state.engine))
    live = await _live_weights(state, [name])
    return {
        **_item(state, _runtime(state), name, config, latest, live),
        "breakers_of": BREAKERS_OF,
        "weights_error": REDIS_DOWN if live is None else None,
        "hours": hours,
        "from": since.isoformat(),
        "history": history.points,
        "history_truncated": history.truncated,
    }


async def _live_weights(state: AppState, names: list[str]) -> LiveWeights:
    """The weights the cycle published for those of `names` that are adaptive (the
    only ones the router takes them for); None when Redis is absent or silent."""
    if state.redis is None:
        return None
    prefix = state.settings.flywheel_redis_prefix
    adaptive = [n for n in names if state.router.routes[n].strategy == "adaptive"]
    if not adaptive:
        return {}
    try:
        async with asyncio.timeout(REDIS_TIMEOUT_S):
            async with state.redis.pipeline(transaction=False) as pipe:  # one round trip
                for name in adaptive:
                    pipe.hgetall(weights_key(prefix, name))
                raw = await pipe.execute()
    except (RedisError, OSError, TimeoutError):
        return None
    out: dict[str, dict[str, float]] = {}
    for name, found in zip(adaptive, raw, strict=True):
        learned = out.setdefault(name, {})
        for dep, value in found.items():
            with contextlib.suppress(
                ValueError
            ):  # a hand-edited value: skipped, as the router does
                learned[dep.decode()] = max(0.0, float(value))
    return out


def _runtime(state: AppState) -> Runtime:
    """This replica's state of every deployment it routes to, by (route, deployment)."""
    return {(str(s["route"]), str(s["deployment"])): s for s in state.router.snapshot()}


def _health(quality: float | None, config: RouteConfig) -> str:
    if quality is None:
        return "unknown"
    if quality < config.cycle.critical:
        return "critical"
    if quality < config.cycle.warning:
        return "warning"
    return "ok"


def _item(
    state: AppState,
    runtime: Runtime,
    name: str,
    config: RouteConfig,
    latest: LatestRun | None,
    live: LiveWeights,
) -> dict[str, Any]:
    figures = (latest.routes.get(name) if latest is not None else None) or {}
    learned = (live or {}).get(name) or {}
    # What the router weighs each deployment by: the cycle's weight where it published
    # one, else the configured weight.
    weights = {d.name: learned.get(d.name, d.weight) for d in config.deployments}
    return {
        "object": "route",
        "name": name,
        "strategy": config.strategy,
        "fallbacks": list(config.fallbacks),
        "ensemble": config.ensemble is not None,
        "thresholds": config.cycle.model_dump(include={"critical", "warning", "target"}),
        "deployments": _deployments(
            state, runtime, name, config, learned if live is not None else None
        ),
        "weights": weights,
        "weights_source": "cycle" if learned else "config",
        **{key: figures.get(key) for key in FIGURES},
        "budgets": figures.get("budgets"),
        "health": _health(figures.get("quality"), config),
        "last_run_id": latest.id if latest is not None else None,
        "last_run_at": latest.started_at if latest is not None else None,
    }


def _deployments(
    state: AppState,
    runtime: Runtime,
    route: str,
    config: RouteConfig,
    learned: Mapping[str, float] | None,
) -> list[dict[str, Any]]:
    out = []
    for d in config.deployments:
        now = runtime.get((route, d.name))  # None: disabled, so the router never built it
        reason = state.router.disabled.get(f"{route}/{d.name}")
        if reason is not None and d.api_key_env:  # the variable's name stays private too
            reason = reason.replace(d.api_key_env, "api_key_env")
        out.append(
            {
                "name": d.name,
                "provider": d.provider,
                "model": d.model,
                "config_weight": d.weight,
                "priority": d.priority,
                "input_cost_per_1k": d.input_cost_per_1k,
                "output_cost_per_1k": d.output_cost_per_1k,
                "enabled": now is not None,
                "disabled_reason": reason,
                "circuit": None if now is None else now["circuit"],
                "concurrency": None if now is None else now["concurrency"],
                "latency_ewma_ms": None if now is None else now["latency_ewma_ms"],
                "retry_after_s": None if now is None else now["retry_after_s"],
                "live_weight": None if learned is None else learned.get(d.name),
            }
        )
    return out
