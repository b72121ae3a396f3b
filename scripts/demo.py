"""`make demo`: the virtuous cycle at work on a running gateway (`make run`).

Talks to the built-in `demo-cycle` route (three mock deployments that differ in quality,
latency and price) through the official OpenAI SDK, as any client would:

1. traffic, with thumbs up/down on some answers; a cycle run; the weights it learned;
2. an incident: the favourite deployment starts answering badly (the demo asks the
   steerable mock to, through request metadata); traffic; a run; how the weights moved;
3. a prompt experiment: a variant that caps answers at 12 tokens against the route's
   own prompt; traffic; a run; the experiment's decision and statistics;
4. the dataset export: how many good answers are ready for fine-tuning.

Only ever talks to a gateway on this machine (loopback), with bounded traffic; it needs
the master key the gateway was started with (FLYWHEEL_MASTER_KEY, from the environment
or `.env` as `make run` reads it, or --master-key). A few hundred requests per phase;
about a minute in all.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

ROUTE = "demo-cycle"
CYCLE = "/v1/virtuous-cycle"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
REFRESH_WAIT_S = 6.0  # gateways re-read weights and variant plans every 5 s by default
QUESTIONS = (
    "How do I reset my password?",
    "What is your refund policy for annual plans?",
    "Can I export my data as CSV?",
    "Why was my card declined?",
    "How do I add a teammate to my workspace?",
    "Is there an API rate limit?",
)


class DemoError(RuntimeError):
    """Something the person running the demo can fix; printed without a traceback."""


@dataclass
class Demo:
    admin: httpx.AsyncClient
    sdk: openai.AsyncOpenAI | None = None
    key: str = ""
    key_id: str | None = None
    concurrency: int = 16
    rng: random.Random = field(default_factory=lambda: random.Random(7))

    async def api(self, method: str, path: str, **kw: Any) -> Any:
        resp = await self.admin.request(method, path, **kw)
        if resp.status_code >= 400:
            raise DemoError(f"{method} {path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json() if resp.content else None


def say(text: str = "") -> None:
    print(text, flush=True)


def bar(share: float, width: int = 24) -> str:
    filled = round(max(0.0, min(1.0, share)) * width)
    return "█" * filled + "·" * (width - filled)


def pct(x: float | None) -> str:
    return "   -  " if x is None else f"{x * 100:5.1f}%"


async def preflight(demo: Demo) -> dict[str, Any]:
    try:
        await demo.admin.get("/health")
    except httpx.HTTPError as e:
        raise DemoError(
            f"no gateway at {demo.admin.base_url} ({type(e).__name__}): start `make run` first"
        ) from e
    resp = await demo.admin.get(f"{CYCLE}/status")
    if resp.status_code in (401, 403):
        raise DemoError(
            "the gateway refused the master key. Start both with the same one, e.g.\n"
            "  export FLYWHEEL_MASTER_KEY=sk-dev-$(openssl rand -hex 16)\n"
            "  make run     # in one terminal\n"
            "  make demo    # in another (same FLYWHEEL_MASTER_KEY)\n"
            "or put FLYWHEEL_MASTER_KEY=... in .env, which both read."
        )
    status: dict[str, Any] = resp.json()
    if ROUTE not in status.get("routes", {}):
        raise DemoError(
            f"this gateway has no {ROUTE!r} route: it serves a routes file "
            "(FLYWHEEL_CONFIG / flywheel.yaml) instead of the built-in routes"
        )
    return status


async def stop_running(demo: Demo) -> None:
    """One experiment at a time per route: one left by an interrupted demo, or started
    by the cycle's optimizer (when one is configured), would block the demo's."""
    running = await demo.api(
        "GET", f"{CYCLE}/experiments", params={"route": ROUTE, "status": "running"}
    )
    for exp in running["data"]:
        await demo.api("POST", f"{CYCLE}/experiments/{exp['id']}/stop")


async def start_client(demo: Demo, base: str) -> None:
    """A virtual key of the demo's own (revoked at the end), and an SDK client with it.
    With an RPM of its own: a key without one gets the gateway's default per-key limit
    (100 a minute), a few seconds of this demo's traffic."""
    spec = {"name": "flywheel-demo", "rpm": 10_000}
    made = await demo.api("POST", "/admin/keys", json=spec)
    demo.key, demo.key_id = made["key"], made["id"]
    demo.sdk = openai.AsyncOpenAI(base_url=base + "/v1", api_key=demo.key, max_retries=0)


def looks_good(message: Any, finish: str | None) -> bool:
    """What a person glancing at the answer would think of it."""
    text = message.content or ""
    return finish == "stop" and len(text) > 20 and not text.startswith(("{", "I'm sorry"))


async def ask(demo: Demo, meta: dict[str, str] | None) -> tuple[str, str, bool]:
    """One question through the SDK: (completion id, deployment, looked good)."""
    assert demo.sdk is not None
    question = f"{demo.rng.choice(QUESTIONS)} (ticket #{demo.rng.randrange(10**6)})"
    raw = await demo.sdk.chat.completions.with_raw_response.create(
        model=ROUTE,
        messages=[{"role": "user", "content": question}],
        metadata=openai.omit if meta is None else meta,
    )
    done = raw.parse()
    choice = done.choices[0]
    return (
        done.id,
        raw.headers["x-flywheel-deployment"],
        looks_good(choice.message, choice.finish_reason),
    )


async def traffic(
    demo: Demo, n: int, *, meta: dict[str, str] | None = None, feedback: float = 0.0
) -> Counter[str]:
    """n requests, `concurrency` at a time; thumbs on a `feedback` share of the answers.
    Returns the answers per deployment."""
    served: Counter[str] = Counter()
    gate = asyncio.Semaphore(demo.concurrency)

    async def one() -> None:
        async with gate:
            try:
                cid, deployment, good = await ask(demo, meta)
            except openai.APIError as e:
                served["(failed)"] += 1
                if isinstance(e, openai.APIStatusError) and e.status_code < 500:
                    raise DemoError(f"the gateway refused a request: {e}") from e
                return
            served[deployment] += 1
            if demo.rng.random() < feedback:
                thumbs = {"id": cid, "thumbs": "up" if good else "down"}
                auth = {"authorization": f"Bearer {demo.key}"}
                await demo.api("POST", "/v1/feedback", json=thumbs, headers=auth)

    await asyncio.gather(*(one() for _ in range(n)))
    return served


async def consolidated(demo: Demo, timeout_s: float = 30.0) -> None:
    """Until every record and score the gateway shipped is in the database."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = await demo.api("GET", "/health/detailed")
        queue = (health.get("consolidation") or {}).get("queue_length", 0)
        if health["recorder"]["pending"] == 0 and queue == 0:
            return
        await asyncio.sleep(0.3)
    raise DemoError("the worker did not store the requests in time: is `make run` healthy?")


async def cycle_run(demo: Demo) -> dict[str, Any]:
    """Trigger a run (after any run already going) and return it when it is done."""
    await consolidated(demo)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        job = await demo.api("POST", f"{CYCLE}/trigger")
        if job["already_running"]:  # a scheduled run: it may predate our traffic
            await asyncio.sleep(1.0)
            continue
        while time.monotonic() < deadline:
            state = await demo.api("GET", f"/admin/jobs/{job['id']}")
            if state["status"] == "complete":
                if "error" in state:
                    raise DemoError(f"the cycle run failed: {state['error']['message']}")
                return dict(await demo.api("GET", f"{CYCLE}/runs/{state['result']['run_id']}"))
            await asyncio.sleep(0.5)
    raise DemoError("the cycle run did not finish in time: is the worker running?")


def weights_of(status: dict[str, Any]) -> dict[str, float]:
    w = status["routes"][ROUTE]["weights"]
    total = sum(w.values()) or 1.0
    return {k: v / total for k, v in w.items()}


def show_weights(before: dict[str, float], after: dict[str, float], served: Counter[str]) -> None:
    say(f"    {'deployment':16} {'served':>6}   {'weight before':>13} → {'after':6}")
    for name in after:
        was, now = before.get(name, 0.0), after[name]
        arrow = "▲" if now > was + 0.02 else "▼" if now < was - 0.02 else " "
        line = f"{served.get(name, 0):6}   {pct(was):>13} → {pct(now)} {arrow} {bar(now)}"
        say(f"    {name:16} {line}")


def show_figures(run: dict[str, Any]) -> None:
    deps = (run["routes"].get(ROUTE) or {}).get("deployments") or {}
    say(f"    {'':16} {'answers':>7} {'quality':>8} {'p95 ms':>7} {'$/request':>10}")
    for name, f in deps.items():
        q = "-" if f["quality"] is None else f"{f['quality']:.3f}"
        p95 = "-" if f["p95_latency_ms"] is None else f"{f['p95_latency_ms']:.0f}"
        cost = "-" if f["cost_per_request"] is None else f"{f['cost_per_request']:.6f}"
        say(f"    {name:16} {f['requests']:7} {q:>8} {p95:>7} {cost:>10}")
    for finding in run["findings"]:
        if finding["route"] == ROUTE and finding["severity"] in ("critical", "high"):
            say(f"    ! {finding['severity']}: {finding['message']}")


async def learn(demo: Demo, status: dict[str, Any], n: int) -> dict[str, float]:
    say(f"1. Learning: {n} requests to {ROUTE!r}, thumbs up/down on about a third of them")
    before = weights_of(status)
    if status["routes"][ROUTE]["requests"]:  # the last run saw traffic on the route
        say("   (this gateway learned from earlier traffic: the weights start from there)")
    served = await traffic(demo, n, feedback=0.35)
    run = await cycle_run(demo)
    after = weights_of(await demo.api("GET", f"{CYCLE}/status"))
    say(f"   cycle run {run['id']}: what it measured, and the weights it published")
    show_figures(run)
    show_weights(before, after, served)
    return after


async def incident(demo: Demo, weights: dict[str, float], n: int) -> tuple[str, dict[str, float]]:
    favourite = max(weights, key=lambda k: weights[k])
    say()
    say(f"2. Incident: {favourite} (the favourite, {pct(weights[favourite]).strip()} of traffic)")
    say("   starts answering badly (quality 0.30: empty, cut-off and refused answers)")
    await asyncio.sleep(REFRESH_WAIT_S)  # every replica routes by the published weights
    meta = {f"mock.{favourite}.quality": "0.3"}
    served = await traffic(demo, n, meta=meta, feedback=0.35)
    run = await cycle_run(demo)
    after = weights_of(await demo.api("GET", f"{CYCLE}/status"))
    say(f"   cycle run {run['id']}: the drop is measured and traffic moves away")
    show_figures(run)
    show_weights(weights, after, served)
    return favourite, after


async def experiment(demo: Demo, n: int) -> dict[str, Any]:
    say()
    say("3. Prompt experiment: variant 'terse' (answer in five words, max_tokens 12)")
    say("   against the route's own prompt, half the traffic each")
    spec = {
        "route": ROUTE,
        "name": "terse",
        "system_prompt": "Answer in five words or fewer.",
        "params": {"max_tokens": 12},
    }
    await stop_running(demo)
    variant = await demo.api("POST", f"{CYCLE}/variants", json=spec)
    body = {"route": ROUTE, "variants": [variant["id"]], "traffic_share": 0.5}
    exp = await demo.api("POST", f"{CYCLE}/experiments", json=body)
    await asyncio.sleep(REFRESH_WAIT_S)  # every replica applies the new plan
    await traffic(demo, n)
    await cycle_run(demo)
    found: dict[str, Any] = await demo.api("GET", f"{CYCLE}/experiments/{exp['id']}")
    show_experiment(found, variant["id"])
    if found["status"] == "running":  # these settings want more traffic than a demo sends
        found = await demo.api("POST", f"{CYCLE}/experiments/{exp['id']}/stop")
        say("    (not decided on this much traffic: stopped, its variant retired)")
    return found


def show_experiment(exp: dict[str, Any], variant: str) -> None:
    decision = exp.get("decision") or {}
    policy = decision.get("policy") or {}
    for c in decision.get("comparisons") or ():
        arm, control, diff = c["variant_arm"], c["control_arm"], c["difference"]
        name = "terse" if c["variant"] == variant else c["variant"]
        say(f"    {'baseline':9} n={control['n']:<5.0f} mean quality {control['mean']:.3f}")
        say(f"    {name:9} n={arm['n']:<5.0f} mean quality {arm['mean']:.3f}")
        if diff.get("low") is not None:
            say(
                f"    difference {diff['estimate']:+.3f}, bounds [{diff['low']:+.3f},"
                f" {diff['high']:+.3f}] at {1 - c['alpha']:.3f} confidence;"
                f" needed: +{policy.get('min_improvement', 0):.2f}"
            )
        say(f"    verdict: {c['verdict']} ({c['rule'].replace('_', ' ')})")
    say(f"    experiment {exp['id']}: {exp['status']}")


async def dataset(demo: Demo) -> int:
    resp = await demo.admin.get(f"{CYCLE}/datasets", params={"route": ROUTE, "limit": 100_000})
    if resp.status_code != 200:
        raise DemoError(f"the dataset export answered {resp.status_code}: {resp.text[:200]}")
    return len(resp.text.splitlines())


async def run(args: argparse.Namespace, master: str) -> None:
    base = args.base_url.rstrip("/")
    auth = {"authorization": f"Bearer {master}"}
    async with httpx.AsyncClient(base_url=base, headers=auth, timeout=30) as admin:
        demo = Demo(admin, concurrency=args.concurrency)
        status = await preflight(demo)
        await start_client(demo, base)
        started = time.monotonic()
        try:
            say(f"Flywheel demo on {base} (policy: {status['policy']})")
            say()
            weights = await learn(demo, status, args.requests)
            favourite, after = await incident(demo, weights, args.requests)
            exp = await experiment(demo, 2 * args.requests)
            examples = await dataset(demo)
            say()
            say(f"4. Dataset: {examples} answers scored 0.9+ ready for fine-tuning:")
            say(
                f"   curl -H 'Authorization: Bearer $FLYWHEEL_MASTER_KEY' \\\n"
                f"     '{base}{CYCLE}/datasets?route={ROUTE}' > {ROUTE}.jsonl"
            )
            say()
            say(
                f"Summary ({time.monotonic() - started:.0f} s): the cycle sent "
                f"{pct(weights[favourite]).strip()} of traffic to {favourite}; after it degraded, "
                f"{pct(after[favourite]).strip()}; the 'terse' prompt experiment: {exp['status']}."
            )
            say(f"More: GET {CYCLE}/status, {CYCLE}/runs, {CYCLE}/experiments (master key).")
        finally:
            if demo.sdk is not None:
                await demo.sdk.close()
            if demo.key_id is not None:
                await admin.delete(f"/admin/keys/{demo.key_id}")


def master_key(given: str | None) -> str:
    if given:
        return given
    from app.config import Settings  # reads the environment and .env, as `make run` does
    from app.embedded import MASTER_KEY_FILE

    settings = Settings()
    if settings.flywheel_master_key is not None:
        return settings.flywheel_master_key.get_secret_value()
    # `make run` without one made one for the embedded system, here.
    made = settings.flywheel_var_dir / MASTER_KEY_FILE
    if made.exists():
        return made.read_text(encoding="utf-8").strip()
    raise DemoError(
        "no master key: start the system with `make run` (it keeps one in "
        f"{made}), or pass --master-key / set FLYWHEEL_MASTER_KEY as the gateway has it"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--master-key", default=None, help="default: FLYWHEEL_MASTER_KEY")
    parser.add_argument("--requests", type=int, default=240, help="per phase (10-1000)")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    host = urlsplit(args.base_url).hostname
    if host not in LOOPBACK:
        print(
            f"demo: {host!r} is not this machine; the demo only talks to a local gateway",
            file=sys.stderr,
        )
        return 2
    args.requests = max(10, min(1000, args.requests))
    args.concurrency = max(1, min(64, args.concurrency))
    try:
        asyncio.run(run(args, master_key(args.master_key)))
    except DemoError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
