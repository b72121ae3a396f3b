"""Prompt variants and experiments (master key), under /v1/virtuous-cycle.

Operators create variants of a route's system prompt, start an experiment that splits
the route's traffic between its current baseline and some variants, and may stop it;
the workers decide it (promote, retire, roll back). Every change republishes the
route's plan to Redis for the gateways; if Redis does not answer, the next cycle run
publishes it (`plan_published: false` says so).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Path, Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from redis.exceptions import RedisError

from app.api.cycle import read_db
from app.cycle.variants import BASELINE, VariantArm
from app.deps import AdminDep, StateDep
from app.errors import InvalidRequestError, NotFoundError
from app.schemas.storable import StorableText, storable_json
from app.state import AppState
from app.store.db import DB_ERRORS
from app.store.experiments import (
    LIVE,
    create_experiment,
    create_variant,
    get_experiment,
    get_variant,
    list_experiments,
    list_variants,
    promoted_variant,
    set_variant_status,
    update_experiment,
)
from app.store.variant_plans import publish_route

router = APIRouter(prefix="/v1/virtuous-cycle", tags=["virtuous-cycle"], dependencies=[AdminDep])

log = logging.getLogger("flywheel.cycle")

VariantId = Annotated[str, Path(pattern=r"^var_[0-9a-f]{24}$")]
ExperimentId = Annotated[str, Path(pattern=r"^exp_[0-9a-f]{24}$")]
MAX_PROMPT = 32_000
PUBLISH_TIMEOUT_S = 3.0


class Conflict(InvalidRequestError):
    status = 409
    code = "conflict"


class VariantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    route: StorableText = Field(min_length=1, max_length=128)
    name: StorableText = Field(min_length=1, max_length=200)
    system_prompt: StorableText | None = Field(default=None, max_length=MAX_PROMPT)
    params: Annotated[dict[str, float | int], AfterValidator(storable_json)] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _changes_something(self) -> VariantCreate:
        if self.system_prompt is None and not self.params:
            raise ValueError("a variant sets a system_prompt, params, or both")
        return self


class ExperimentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    route: StorableText = Field(min_length=1, max_length=128)
    variants: list[StorableText] = Field(min_length=1, max_length=10)
    # The share of traffic the variants get together (split evenly); the rest stays on
    # the baseline.
    traffic_share: float = Field(default=0.5, gt=0, lt=1)


def _route(state: AppState, name: str) -> None:
    config = state.router.routes.get(name)
    if config is None or config.ensemble is not None:
        raise NotFoundError(
            f"no route {name!r} that takes prompt variants", param="route", code="route_not_found"
        )


async def _publish(state: AppState, route: str) -> bool:
    redis = state.redis
    if redis is None:
        return False
    prefix = state.settings.flywheel_redis_prefix
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await publish_route(state.engine, redis, prefix, route)
    except (RedisError, OSError, TimeoutError, *DB_ERRORS) as e:
        log.warning(
            "plan of route %s not published (%s); the next run will", route, type(e).__name__
        )
        return False
    return True


@router.post("/variants", status_code=201)
async def variant_create(state: StateDep, spec: Annotated[VariantCreate, Body()]) -> dict[str, Any]:
    _route(state, spec.route)
    try:  # the same checks the gateways apply to a plan's arms
        VariantArm("check", 1.0, spec.system_prompt, spec.params)
    except ValueError as e:
        raise InvalidRequestError(str(e), param="params", code="invalid_value") from e
    now = datetime.now(UTC)
    return await read_db(
        "variants",
        lambda: create_variant(
            state.engine,
            now,
            route=spec.route,
            name=spec.name,
            system_prompt=spec.system_prompt,
            params=spec.params,
            source="admin",
        ),
    )


@router.get("/variants")
async def variant_list(
    state: StateDep,
    route: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    data = await read_db("variants", lambda: list_variants(state.engine, route, limit))
    return {"object": "list", "data": data}


@router.get("/variants/{variant_id}")
async def variant_get(state: StateDep, variant_id: VariantId) -> dict[str, Any]:
    found = await read_db("variants", lambda: get_variant(state.engine, variant_id))
    if found is None:
        raise NotFoundError(f"no variant {variant_id}", code="variant_not_found")
    return found


@router.post("/variants/{variant_id}/retire")
async def variant_retire(state: StateDep, variant_id: VariantId) -> dict[str, Any]:
    """Retire a variant (kept for the record). Retiring the promoted one returns its
    route to the clients' own prompt; one under test must be stopped with its
    experiment."""
    found = await variant_get(state, variant_id)
    if found["status"] == "testing":
        raise Conflict(f"variant {variant_id} is under test: stop its experiment first")
    now = datetime.now(UTC)
    engine = state.engine
    await read_db("variants", lambda: set_variant_status(engine, [variant_id], "retired", now))
    # A promotion under watch ends with its variant: nothing is left to watch.
    for exp in await read_db(
        "experiments", lambda: list_experiments(engine, found["route"], ("watching",))
    ):
        if exp["winner"] == variant_id:
            await read_db(
                "experiments",
                lambda exp=exp: update_experiment(  # type: ignore[misc]
                    engine, exp["id"], status="stopped", ended_at=now
                ),
            )
    published = await _publish(state, found["route"])
    return {**await variant_get(state, variant_id), "plan_published": published}


@router.post("/experiments", status_code=201)
async def experiment_create(
    state: StateDep, spec: Annotated[ExperimentCreate, Body()]
) -> dict[str, Any]:
    """Start an experiment: the route's current baseline (its promoted variant, or the
    clients' own prompt) against the given candidate variants."""
    _route(state, spec.route)
    engine = state.engine
    if await read_db("experiments", lambda: list_experiments(engine, spec.route, LIVE, 1)):
        raise Conflict(f"route {spec.route!r} already has an experiment running or watched")
    for vid in dict.fromkeys(spec.variants):
        v = await read_db("variants", lambda vid=vid: get_variant(engine, vid))  # type: ignore[misc]
        if v is None or v["route"] != spec.route:
            raise NotFoundError(
                f"no variant {vid} on route {spec.route!r}", code="variant_not_found"
            )
        if v["status"] != "candidate":
            raise Conflict(f"variant {vid} is {v['status']}, not a candidate")
    promoted = await read_db("variants", lambda: promoted_variant(engine, spec.route))
    control = promoted["id"] if promoted else BASELINE
    variants = list(dict.fromkeys(spec.variants))
    each = spec.traffic_share / len(variants)
    arms = {control: 1.0 - spec.traffic_share} | dict.fromkeys(variants, each)
    now = datetime.now(UTC)
    created = await read_db(
        "experiments",
        lambda: create_experiment(
            engine, now, route=spec.route, control=control, arms=arms, origin="admin"
        ),
    )
    return {**created, "plan_published": await _publish(state, spec.route)}


@router.get("/experiments")
async def experiment_list(
    state: StateDep,
    route: Annotated[str | None, Query(max_length=128)] = None,
    status: Annotated[
        Literal["running", "watching", "kept", "rolled_back", "retired", "inconclusive", "stopped"]
        | None,
        Query(),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> dict[str, Any]:
    statuses = None if status is None else (status,)
    data = await read_db(
        "experiments", lambda: list_experiments(state.engine, route, statuses, limit)
    )
    return {"object": "list", "data": data}


@router.get("/experiments/{experiment_id}")
async def experiment_get(state: StateDep, experiment_id: ExperimentId) -> dict[str, Any]:
    found = await read_db("experiments", lambda: get_experiment(state.engine, experiment_id))
    if found is None:
        raise NotFoundError(f"no experiment {experiment_id}", code="experiment_not_found")
    return found


@router.post("/experiments/{experiment_id}/stop")
async def experiment_stop(state: StateDep, experiment_id: ExperimentId) -> dict[str, Any]:
    """Stop an experiment. A running one: its variants are retired and the baseline keeps
    all the traffic. A watched promotion: the watch ends and the promoted variant stays
    (retire it to return to the previous prompt)."""
    found = await experiment_get(state, experiment_id)
    if found["status"] not in LIVE:
        raise Conflict(f"experiment {experiment_id} is {found['status']}, not running")
    now = datetime.now(UTC)
    engine = state.engine
    if found["status"] == "running":
        tested = [v for v in found["arms"] if v != found["control"]]
        await read_db("variants", lambda: set_variant_status(engine, tested, "retired", now))
    await read_db(
        "experiments",
        lambda: update_experiment(engine, experiment_id, status="stopped", ended_at=now),
    )
    published = await _publish(state, found["route"])
    return {**await experiment_get(state, experiment_id), "plan_published": published}
