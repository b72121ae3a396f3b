"""Figures (a flat name → number map per run), their medians, and the printed report."""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Figures = dict[str, float]
KINDS = (("json", "JSON (non-streaming)"), ("stream", "SSE streaming (full response)"))
CONCURRENCY = (1, 16, 64)
# The calibration reference (bench/reference.py) served this at c=16 on the machine
# where the targets were set.
CALIBRATION_RPS_C16 = 6000.0
CALIBRATED_LATENCIES = (
    "json.c1.added_p50_ms",
    "json.c1.added_p99_ms",
    "json.c64.gateway.p99_ms",
    "ttft.added_median_ms",
    "cache.l1.p50_ms",
    "cache.l2.p50_ms",
    "auth.added_p50_ms",
)
CACHE_TIERS = (("l1", "L1 hit (in-process)"), ("l2", "L2 hit (Redis; L1 off)"))
AUTH_SIDES = (("anon", "no key (anonymous)"), ("key", "virtual key: RPM+TPM+$"))


@dataclass(frozen=True)
class Target:
    label: str
    key: str
    op: str  # "<=" or ">="
    limit: float
    unit: str

    def met(self, value: float) -> bool:
        compare: Callable[[float, float], bool] = operator.le if self.op == "<=" else operator.ge
        return compare(value, self.limit)

    def verdict(self, fig: Figures) -> str:
        """One of ok, MISS, n/a (not measured), noisy (a negative added latency)."""
        if self.key not in fig:
            return "n/a"
        if ".added_" in self.key and fig[self.key] < 0:
            return "noisy"  # the direct side was slower than the gateway: noise, no result
        return "ok" if self.met(fig[self.key]) else "MISS"


def targets() -> list[Target]:
    """The issue's targets: JSON latency and throughput, streaming time to first token.

    The streaming rows of the tables are reported, not judged: the targets set none.
    """
    return [
        Target("json: added latency c=1 p50", "json.c1.added_p50_ms", "<=", 0.6, "ms"),
        Target("json: added latency c=1 p99", "json.c1.added_p99_ms", "<=", 1.5, "ms"),
        Target("json: gateway c=16 throughput", "json.c16.gateway.rps", ">=", 2500, "/s"),
        Target("json: gateway c=16 errors", "json.c16.gateway.errors", "<=", 0, ""),
        Target("json: gateway c=64 p99", "json.c64.gateway.p99_ms", "<=", 40, "ms"),
        Target("stream: gateway c=16 errors", "stream.c16.gateway.errors", "<=", 0, ""),
        Target("stream: TTFT added c=1 (median)", "ttft.added_median_ms", "<=", 1.0, "ms"),
        Target("cache: L1-hit p50 c=16", "cache.l1.p50_ms", "<=", 1.0, "ms"),
        Target("cache: L2-hit p50 c=16", "cache.l2.p50_ms", "<=", 2.5, "ms"),
        Target("auth+limits: added p50 c=1", "auth.added_p50_ms", "<=", 0.5, "ms"),
        Target("idle RSS", "rss.idle_mb", "<=", 120, "MB"),
        # The speed-bound targets again, this machine's speed factored out (see
        # add_derived): then they compare with the targets on any day.
        Target("calibrated: added c=1 p50", "json.c1.added_p50_ms_calibrated", "<=", 0.6, "ms"),
        Target("calibrated: added c=1 p99", "json.c1.added_p99_ms_calibrated", "<=", 1.5, "ms"),
        Target("calibrated: c=16 throughput", "json.c16.gateway.rps_calibrated", ">=", 2500, "/s"),
        Target("calibrated: c=64 p99", "json.c64.gateway.p99_ms_calibrated", "<=", 40, "ms"),
        Target("calibrated: TTFT added c=1", "ttft.added_median_ms_calibrated", "<=", 1.0, "ms"),
        Target("calibrated: cache L1-hit p50", "cache.l1.p50_ms_calibrated", "<=", 1.0, "ms"),
        Target("calibrated: cache L2-hit p50", "cache.l2.p50_ms_calibrated", "<=", 2.5, "ms"),
        Target("calibrated: auth+limits added", "auth.added_p50_ms_calibrated", "<=", 0.5, "ms"),
        Target("cold start (median of starts)", "cold_start_s", "<=", 2.0, "s"),
    ]


def add_derived(fig: Figures) -> None:
    """Gateway-minus-direct figures of one run (both sides measured in the same run)."""
    for kind, _ in KINDS:
        for c in CONCURRENCY:
            base = f"{kind}.c{c}"
            if f"{base}.gateway.p50_ms" in fig and f"{base}.direct.p50_ms" in fig:
                for p in ("p50", "p99"):
                    added = fig[f"{base}.gateway.{p}_ms"] - fig[f"{base}.direct.{p}_ms"]
                    fig[f"{base}.added_{p}_ms"] = added
    if "ttft.gateway.median_ms" in fig and "ttft.direct.median_ms" in fig:
        for stat in ("median", "p99"):
            added = fig[f"ttft.gateway.{stat}_ms"] - fig[f"ttft.direct.{stat}_ms"]
            fig[f"ttft.added_{stat}_ms"] = added
    ref = fig.get("json.c16.reference.rps")
    if ref and "json.c16.gateway.rps" in fig:
        # How fast this machine ran the reference, relative to the calibration machine.
        # The gateway's added time is CPU time on the request path, and queueing at a
        # fixed concurrency is that time again per request ahead: both scale with it.
        speed = ref / CALIBRATION_RPS_C16
        fig["machine_speed"] = speed
        fig["json.c16.gateway.rps_calibrated"] = fig["json.c16.gateway.rps"] / speed
        for key in CALIBRATED_LATENCIES:
            if key in fig:
                fig[f"{key}_calibrated"] = fig[key] * speed


def medians(runs: Sequence[Figures]) -> Figures:
    """Per figure, the median over the runs that have it."""
    keys = sorted({k for run in runs for k in run})
    return {k: statistics.median(run[k] for run in runs if k in run) for k in keys}


def _num(fig: Figures, key: str, fmt: str = "{:.2f}") -> str:
    return fmt.format(fig[key]) if key in fig else "-"


def _cell(fig: Figures, prefix: str) -> str:
    return (
        f"{_num(fig, prefix + '.rps', '{:.0f}'):>8} "
        f"{_num(fig, prefix + '.p50_ms'):>7} {_num(fig, prefix + '.p90_ms'):>7} "
        f"{_num(fig, prefix + '.p99_ms'):>7} {_num(fig, prefix + '.errors', '{:.0f}'):>5}"
    )


def load_tables(fig: Figures) -> list[str]:
    head = f"{'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'err':>5}"
    lines: list[str] = []
    for kind, title in KINDS:
        lines += [
            "",
            f"{title} — latency in ms",
            f"{'':>5} | {'direct to nginx':^37} | {'through the gateway':^37} | "
            f"{'added':^15} | gateway",
            f"{'conc':>5} | {head} | {head} | {'p50':>7} {'p99':>7} | cpu/req",
        ]
        for c in CONCURRENCY:
            base = f"{kind}.c{c}"
            lines.append(
                f"{c:>5} | {_cell(fig, base + '.direct')} | {_cell(fig, base + '.gateway')} | "
                f"{_num(fig, base + '.added_p50_ms'):>7} {_num(fig, base + '.added_p99_ms'):>7} | "
                f"{_num(fig, base + '.gateway.cpu_ms_per_req', '{:.3f}'):>7}"
            )
    return lines


def cache_lines(fig: Figures) -> list[str]:
    if not any(f"cache.{tier}.rps" in fig for tier, _ in CACHE_TIERS):
        return []
    head = f"{'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'err':>5}"
    lines = [
        "",
        "Cache hits through the gateway: one identical JSON request, c=16 — latency in ms",
        f"{'tier':<22} | {head} | cpu/req | hits",
    ]
    for tier, title in CACHE_TIERS:
        key = f"cache.{tier}"
        lines.append(
            f"{title:<22} | {_cell(fig, key)} | "
            f"{_num(fig, key + '.cpu_ms_per_req', '{:.3f}'):>7} | "
            f"{_num(fig, key + '.hit_pct', '{:.1f}')}%"
        )
    lines.append("hits: the share of the load's answers counted as hits of that tier.")
    return lines


def auth_lines(fig: Figures) -> list[str]:
    if "auth.added_p50_ms" not in fig:
        return []
    head = f"{'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'err':>5}"
    rounds = f"{fig.get('auth.rounds', 0):.0f} rounds of {fig.get('auth.round_s', 0):.0f} s"
    lines = [
        "",
        f"Authentication + per-key limits: JSON, c=1, one gateway, sides alternating ({rounds})"
        " — latency in ms",
        f"{'side':<24} | {head} | cpu/req",
    ]
    for side, title in AUTH_SIDES:
        key = f"auth.{side}"
        lines.append(
            f"{title:<24} | {_cell(fig, key)} | {_num(fig, key + '.cpu_ms_per_req', '{:.3f}'):>7}"
        )
    lines += [
        f"{'added (key - anonymous)':<24} | {'':>8} {_num(fig, 'auth.added_p50_ms', '{:.3f}'):>7} "
        f"{'':>7} {_num(fig, 'auth.added_p99_ms', '{:.3f}'):>7} {'':>5} | "
        f"{_num(fig, 'auth.added_cpu_ms_per_req', '{:.3f}'):>7}",
        "Each side's latencies: the median of its rounds; added: the median of the rounds'",
        "differences. The key is resolved from the gateway's cache, its prompt counted with",
        "tiktoken, its RPM/TPM/budget reserved in Redis (Lua) and settled after the answer.",
    ]
    return lines


def langsmith_lines(fig: Figures) -> list[str]:
    if "ls.added_p50_ms" not in fig:
        return []
    head = f"{'req/s':>8} {'p50':>7} {'p99':>7} {'err':>5}"
    rounds = f"{fig.get('ls.rounds', 0):.0f} rounds of {fig.get('ls.round_s', 0):.0f} s"
    lines = [
        "",
        f"LangSmith hanging: JSON, c=1, two gateways, sides alternating ({rounds}) — ms",
        f"{'side':<24} | {head}",
    ]
    for side, title in (("off", "LangSmith off"), ("hanging", "LangSmith never answers")):
        key = f"ls.{side}"
        lines.append(
            f"{title:<24} | {_num(fig, key + '.rps', '{:.0f}'):>8} {_num(fig, key + '.p50_ms'):>7}"
            f" {_num(fig, key + '.p99_ms'):>7} {_num(fig, key + '.errors', '{:.0f}'):>5}"
        )
    lines += [
        f"{'added (hanging - off)':<24} | {'':>8} {_num(fig, 'ls.added_p50_ms', '{:.3f}'):>7} "
        f"{_num(fig, 'ls.added_p99_ms', '{:.3f}'):>7}",
        "Each side: the median of its rounds; added: the median of the rounds' differences.",
    ]
    return lines


def reference_lines(fig: Figures) -> list[str]:
    if "machine_speed" not in fig:
        return []
    head = f"{'req/s':>8} {'p50':>7} {'p90':>7} {'p99':>7} {'err':>5}"
    lines = [
        "",
        "Calibration reference: bare FastAPI pass-through over aiohttp (no gateway logic), JSON",
        f"{'conc':>5} | {head}",
    ]
    for c in CONCURRENCY:
        lines.append(f"{c:>5} | {_cell(fig, f'json.c{c}.reference')}")
    speed = fig["machine_speed"]
    ratio = fig["json.c16.gateway.rps"] / fig["json.c16.reference.rps"]
    lines += [
        f"The targets were set where the reference served {CALIBRATION_RPS_C16:,.0f} req/s "
        "at c=16;",
        f"here it served {fig['json.c16.reference.rps']:,.0f}: this machine ran at {speed:.2f}x.",
        f"The gateway served {ratio:.2f}x the reference's req/s at c=16, which is "
        f"{fig['json.c16.gateway.rps_calibrated']:,.0f} req/s calibrated;",
        "The latency targets are calibrated by the same factor in the summary.",
    ]
    return lines


def other_lines(fig: Figures) -> list[str]:
    return [
        "",
        "cpu/req: the gateway process's user+system CPU per request, in ms (load-independent;",
        "1000 / cpu/req is roughly the req/s one worker could reach with a core of its own).",
        "",
        "Time to first content token, streaming, c=1 (sequential requests), ms",
        f"  direct   median {_num(fig, 'ttft.direct.median_ms', '{:.3f}'):>8}"
        f"   p99 {_num(fig, 'ttft.direct.p99_ms', '{:.3f}'):>8}",
        f"  gateway  median {_num(fig, 'ttft.gateway.median_ms', '{:.3f}'):>8}"
        f"   p99 {_num(fig, 'ttft.gateway.p99_ms', '{:.3f}'):>8}",
        f"  added    median {_num(fig, 'ttft.added_median_ms', '{:.3f}'):>8}"
        f"   p99 {_num(fig, 'ttft.added_p99_ms', '{:.3f}'):>8}",
        "",
        f"Gateway RSS: idle {_num(fig, 'rss.idle_mb', '{:.1f}')} MB, "
        f"after load {_num(fig, 'rss.after_load_mb', '{:.1f}')} MB",
        f"Cold start (spawn → first 200 on /health): {_num(fig, 'cold_start_s', '{:.3f}')} s",
    ]


def summary(fig: Figures, runs: int) -> list[str]:
    title = "SUMMARY" + (f" (median of {runs} runs)" if runs > 1 else "")
    rule = "-" * 66
    lines = ["", title, f"{'figure':<36} {'value':>10}   {'target':<12}", rule]
    verdicts = []
    for t in targets():
        target = f"{t.op} {t.limit:,g} {t.unit}".strip()
        verdict = t.verdict(fig)
        verdicts.append(verdict)
        shown = "-" if verdict == "n/a" else _num(fig, t.key, "{:.3f}")
        if verdict != "n/a" and t.unit in ("/s", ""):
            shown = f"{fig[t.key]:,.0f}"
        hint = " (rerun with --repeat)" if verdict == "noisy" else ""
        lines.append(f"{t.label:<36} {shown:>10}   {target:<12} {verdict}{hint}")
    met, judged = verdicts.count("ok"), verdicts.count("ok") + verdicts.count("MISS")
    lines += [rule, f"{met} of {judged} judged targets met ({len(verdicts)} in all)"]
    return lines


def render(fig: Figures, runs: int) -> str:
    loaded = any(k.startswith(("json.", "stream.")) for k in fig)  # not with --auth-only
    return "\n".join(
        [
            *(load_tables(fig) if loaded else []),
            *cache_lines(fig),
            *auth_lines(fig),
            *langsmith_lines(fig),
            *reference_lines(fig),
            *(other_lines(fig) if loaded else []),
            *summary(fig, runs),
        ]
    )
