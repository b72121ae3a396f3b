"""Prompt variants on the request path: a route's variant plan, its format, and how a
request gets its arm.

The cycle (and the admin endpoints) publish each route's plan to Redis at
`{prefix}variants:{route}`, a JSON string:

    {"version": 7, "experiment": "exp_…" | null,
     "arms": [{"variant": "baseline", "share": 0.9, "system_prompt": null, "params": {}},
              {"variant": "var_…", "share": 0.1, "system_prompt": "You are …",
               "params": {"temperature": 0.3}}]}

Every gateway replica reads all routes' plans in one MGET every few seconds
(`PlanBook.refresh_forever`) and applies them; no key means no plan (requests pass
through unchanged). An arm without a system prompt and without params is the client's
own request (the baseline); after a promotion the plan has the winner as its one arm.

Pure apart from the two Redis helpers: no FastAPI, no I/O on the request path.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import re
from bisect import bisect_right
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("flywheel.variants")

BASELINE = "baseline"
PROMPT_ROLES = ("system", "developer")
# The sampling parameters a variant may set (OpenAI's names and ranges, the same as the
# request schema's, so an applied request validates whenever the client's did). Anything
# else in a plan's `params` is ignored: a variant changes the prompt and the sampling,
# never what the client asked for (tools, format, n, …).
PARAM_RANGES: Mapping[str, tuple[type, float | None, float | None]] = MappingProxyType(
    {
        "temperature": (float, 0.0, 2.0),
        "top_p": (float, 0.0, 1.0),
        "presence_penalty": (float, -2.0, 2.0),
        "frequency_penalty": (float, -2.0, 2.0),
        "max_tokens": (int, 1, None),
        "seed": (int, None, None),
    }
)
# A variant's name goes into a response header and the records' `variant` column
# (128 characters): header-safe characters only.
_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")


def variants_key(prefix: str, route: str) -> str:
    return f"{prefix}variants:{route}"


@dataclass(frozen=True, slots=True)
class VariantArm:
    """One arm of a plan. Validated on construction; unknown params are dropped."""

    variant: str
    share: float
    system_prompt: str | None = None
    # Read-only once built, holding only the whitelisted parameters (others dropped).
    params: Mapping[str, Any] = field(default_factory=dict)
    # What the arm does to a request, hashed: part of the cache key with the name, so
    # an answer is never served to an arm that would have sent something else, even if
    # a variant's text changed under the same name.
    fingerprint: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if not isinstance(self.variant, str) or not _NAME.fullmatch(self.variant):
            raise ValueError(f"variant name {self.variant!r} is not 1-128 of [A-Za-z0-9_.:-]")
        if not isinstance(self.share, int | float) or isinstance(self.share, bool):
            raise ValueError(f"{self.variant}: share must be a number")
        if not math.isfinite(self.share) or self.share < 0:
            raise ValueError(f"{self.variant}: share must be finite and >= 0")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"{self.variant}: system_prompt must be a string or null")
        if not isinstance(self.params, Mapping):
            raise ValueError(f"{self.variant}: params must be an object")
        params = MappingProxyType(_checked_params(self.variant, self.params))
        object.__setattr__(self, "share", float(self.share))
        object.__setattr__(self, "params", params)
        material = orjson.dumps([self.system_prompt, dict(params)], option=orjson.OPT_SORT_KEYS)
        digest = hashlib.sha256(material).hexdigest()[:16]
        object.__setattr__(self, "fingerprint", f"{self.variant}:{digest}")

    @property
    def passes_through(self) -> bool:
        """The arm sends the client's request as it is (the baseline)."""
        return self.system_prompt is None and not self.params


def _checked_params(variant: str, params: Mapping[str, Any]) -> dict[str, float | int]:
    out: dict[str, float | int] = {}
    for name, value in params.items():
        if name == "max_completion_tokens":
            name = "max_tokens"  # one spelling in the plan; `apply` uses the client's
        spec = PARAM_RANGES.get(name)
        if spec is None:
            continue
        kind, low, high = spec
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{variant}: param {name} must be a number")
        if kind is int and not isinstance(value, int):
            raise ValueError(f"{variant}: param {name} must be an integer")
        if not math.isfinite(value) or (low is not None and value < low):
            raise ValueError(f"{variant}: param {name} is out of range")
        if high is not None and value > high:
            raise ValueError(f"{variant}: param {name} is out of range")
        out[name] = float(value) if kind is float else value
    return out


@dataclass(frozen=True, slots=True)
class VariantPlan:
    """A route's arms with their shares, normalised to sum to 1 on construction."""

    version: int
    experiment: str | None
    arms: tuple[VariantArm, ...]
    # Each arm's upper cumulative share, the last exactly 1.0 (for `choose`).
    bounds: tuple[float, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise ValueError("version must be an integer")
        if self.experiment is not None and not isinstance(self.experiment, str):
            raise ValueError("experiment must be a string or null")
        arms = tuple(self.arms)
        if not arms or not all(isinstance(a, VariantArm) for a in arms):
            raise ValueError("a plan needs at least one arm")
        if len({a.variant for a in arms}) != len(arms):
            raise ValueError("a plan names each variant once")
        total = math.fsum(a.share for a in arms)
        if not total > 0:
            raise ValueError("a plan's shares must add up to more than 0")
        arms = tuple(replace(a, share=a.share / total) for a in arms)
        bounds, running = [], 0.0
        for a in arms:
            running += a.share
            bounds.append(running)
        bounds[-1] = 1.0  # rounding must never leave a sliver no arm owns
        object.__setattr__(self, "arms", arms)
        object.__setattr__(self, "bounds", tuple(bounds))

    def arm(self, variant: str) -> VariantArm | None:
        return next((a for a in self.arms if a.variant == variant), None)


def parse_plan(raw: bytes | str) -> VariantPlan:
    """A plan from its JSON; ValueError (with why) when it is malformed."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg}") from e
    if not isinstance(data, dict) or not isinstance(data.get("arms"), list):
        raise ValueError("a plan is an object with a list of arms")
    arms = []
    for item in data["arms"]:
        if not isinstance(item, dict):
            raise ValueError("each arm is an object")
        arms.append(
            VariantArm(
                variant=item.get("variant"),  # type: ignore[arg-type]  # checked by the arm
                share=item.get("share"),  # type: ignore[arg-type]
                system_prompt=item.get("system_prompt"),
                params=item.get("params") or {},
            )
        )
    return VariantPlan(data.get("version", 0), data.get("experiment"), tuple(arms))


def plan_json(plan: VariantPlan) -> str:
    return orjson.dumps(
        {
            "version": plan.version,
            "experiment": plan.experiment,
            "arms": [
                {
                    "variant": a.variant,
                    "share": a.share,
                    "system_prompt": a.system_prompt,
                    "params": dict(a.params),
                }
                for a in plan.arms
            ],
        }
    ).decode()


def choose(plan: VariantPlan, sticky: str | None, rng: random.Random) -> VariantArm:
    """The arm for one request. With `sticky` (the caller's identity within the route:
    the gateway passes route + user) the same caller gets the same arm for the whole
    experiment: a hash of experiment + sticky places it in [0, 1), and the arms own
    consecutive slices of that interval by share, so a changed split moves only the
    callers on the moved boundaries. Without it, a fresh draw per request."""
    arms = plan.arms
    if len(arms) == 1:
        return arms[0]
    if sticky is None:
        point = rng.random()
    else:
        material = f"{plan.experiment or ''}\x00{sticky}".encode()
        digest = hashlib.blake2b(material, digest_size=8).digest()
        point = int.from_bytes(digest, "big") / 2.0**64
    return arms[min(bisect_right(plan.bounds, point), len(arms) - 1)]


def apply(arm: VariantArm, body: dict[str, Any]) -> dict[str, Any]:
    """The request `arm` sends upstream for `body`: a new dict sharing every untouched
    value with `body` (which is never modified), or `body` itself when the arm passes
    through. The prompt replaces the first system (or developer) message's content, or
    comes first as a system message; the params replace the client's."""
    if arm.passes_through:
        return body
    out = dict(body)
    if arm.system_prompt is not None:
        out["messages"] = _with_prompt(body.get("messages"), arm.system_prompt)
    for name, value in arm.params.items():
        # `max_tokens` in whichever spelling the client used (reasoning models refuse
        # `max_tokens`): both replaced when it sent both, `max_tokens` when neither.
        if name == "max_tokens" and "max_completion_tokens" in out:
            out["max_completion_tokens"] = value
            if "max_tokens" not in out:
                continue
        out[name] = value
    return out


def _with_prompt(messages: Any, prompt: str) -> Any:
    if not isinstance(messages, list):
        return messages  # not a request validation will accept: left for it to refuse
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") in PROMPT_ROLES:
            replaced = list(messages)
            replaced[i] = {**message, "content": prompt}
            return replaced
    return [{"role": "system", "content": prompt}, *messages]


async def publish_plan(redis: Redis, prefix: str, route: str, plan: VariantPlan | None) -> None:
    """Make `plan` the route's plan on every replica (None: no plan, pass-through)."""
    if plan is None:
        await redis.delete(variants_key(prefix, route))
    else:
        await redis.set(variants_key(prefix, route), plan_json(plan))


OnMalformed = Callable[[str, bytes, ValueError], None]


def _warn(route: str, raw: bytes, error: ValueError) -> None:
    log.warning("variant plan of route %r ignored: %s", route, error)


async def read_plans(
    redis: Redis,
    prefix: str,
    routes: Sequence[str],
    last: Mapping[str, VariantPlan] | None = None,
    on_malformed: OnMalformed = _warn,
) -> dict[str, VariantPlan]:
    """The routes' plans in one round trip (MGET); routes without one are left out. A
    malformed plan is reported to `on_malformed` and the route keeps its plan in `last`
    (the last good one), if any."""
    if not routes:
        return {}
    keys = [variants_key(prefix, r) for r in routes]
    values = await cast(Awaitable[list[bytes | None]], redis.mget(keys))
    plans: dict[str, VariantPlan] = {}
    for route, raw in zip(routes, values, strict=True):
        if raw is None:
            continue
        try:
            plans[route] = parse_plan(raw)
        except ValueError as e:
            on_malformed(route, raw, e)
            kept = None if last is None else last.get(route)
            if kept is not None:
                plans[route] = kept
    return plans


class PlanBook:
    """The plans this replica applies, by route. `plans` is replaced whole by each
    refresh (never changed in place), so the request path reads it with one lookup."""

    __slots__ = ("_warned", "plans", "rng")

    def __init__(self, rng: random.Random | None = None) -> None:
        self.plans: dict[str, VariantPlan] = {}
        self.rng = rng or random.Random()  # a traffic split, not a secret
        self._warned: dict[str, bytes] = {}  # route → the malformed value warned about

    async def refresh(self, redis: Redis, prefix: str, routes: Sequence[str]) -> None:
        bad: set[str] = set()

        def malformed(route: str, raw: bytes, error: ValueError) -> None:
            # One warning per malformed value, not one per refresh while it stays there.
            bad.add(route)
            if self._warned.get(route) != raw:
                self._warned[route] = raw
                _warn(route, raw, error)

        plans = await read_plans(redis, prefix, routes, self.plans, malformed)
        self._warned = {r: raw for r, raw in self._warned.items() if r in bad}
        self.plans = plans

    async def refresh_forever(
        self, redis: Redis, prefix: str, routes: Iterable[str], every_s: float
    ) -> None:
        """Refresh every `every_s`; while Redis is down, keep the last plans (one
        warning per outage)."""
        names = list(routes)
        failing = False
        while True:
            try:
                await self.refresh(redis, prefix, names)
                failing = False
            except (RedisError, OSError) as e:
                if not failing:
                    log.warning(
                        "variant plans not refreshed (%s); keeping the last", type(e).__name__
                    )
                failing = True
            await asyncio.sleep(every_s)
