"""The soak's figures as text (a row a minute, a summary) and as markdown, and the memory
verdict."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from soak.load import Minute, Outcome, Sample, Stats
from soak.traffic import KINDS

# "Flat" memory: from the end of the warm-up to the end of the run, a process's RSS may
# grow by less than FLAT_MAX_MB *and* less than FLAT_MAX_PCT of where it stood.
#
# Why this is fair: after the warm-up minute every pool, lazy import, compiled regex and
# cache the steady state needs exists (the L1 cache is sized to be full by then, see
# soak.py), so from there on a process that does not leak only moves by allocator noise:
# CPython's arenas and glibc's malloc keep freed pages mapped, and fragmentation lets
# the high-water mark creep by a few MB before it settles; a GC pass or a background
# job (the worker's 5-minute metrics and cycle runs) adds a transient step. For the
# ~110 MB processes here the percentage is the binding bound (~11 MB, several times that
# noise); 30 MB caps it for a larger process (several uvicorn workers). A real leak
# costs more over the default run: keeping 1 KB per request at 100 req/s for the 9
# minutes after warm-up is 54 MB, and even a quarter of that fails the verdict. A short
# run (2 minutes: one judged) is a smoke test: only a fast leak shows in it.
# Each end is the median of the samples over FLAT_WINDOW_S, so one sample taken in the
# middle of a GC pass or a large response does not decide the verdict.
FLAT_MAX_MB = 30.0
FLAT_MAX_PCT = 10.0
FLAT_WINDOW_S = 15.0


def percentiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p50, p95, p99); zeros for no values."""
    if not values:
        return 0.0, 0.0, 0.0
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=100, method="inclusive")
    return q[49], q[94], q[98]


def labels(items: Sequence[tuple[str, int]]) -> str:
    return ", ".join(f"{label} x{n}" for label, n in items) or "none"


# Once a minute

HEADER = (
    f"{'min':>3}  {'sent/s':>6}  {'done/s':>6}  {'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}  "
    f"{'ok':>6}  {'exp.err':>7}  {'unexp.':>6}  {'gateway MB':>10}  {'worker MB':>9}  "
    f"{'rec.lag s':>9}"
)


def lag(minute: Minute) -> str:
    found = (minute.health.get("consolidation") or {}).get("lag_s")
    return "?" if found is None else f"{found:.1f}"


def row(minute: Minute) -> str:
    s = minute.stats
    p50, p95, p99 = percentiles(s.latencies_ms)
    line = (
        f"{minute.index:>3}  {minute.sent / 60:>6.1f}  {len(s.latencies_ms) / 60:>6.1f}  "
        f"{p50:>7.1f}  {p95:>7.1f}  {p99:>7.1f}  {s.count('ok'):>6}  "
        f"{s.count('expected'):>7}  {s.count('unexpected'):>6}  {minute.gateway_mb:>10.1f}  "
        f"{minute.worker_mb:>9.1f}  {lag(minute):>9}"
    )
    details = f"     expected: {labels(s.labels('expected'))}"
    if s.count("unexpected"):
        details += f"\n     UNEXPECTED: {labels(s.labels('unexpected'))}"
    return line + "\n" + details


def markdown_rows(minutes: Sequence[Minute]) -> str:
    lines = [
        "| Minute | Sent/s | Answered/s | p50 ms | p95 ms | p99 ms | OK | Expected errors "
        "| Unexpected | Gateway RSS MB | Worker RSS MB | Records lag s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in minutes:
        s = m.stats
        p50, p95, p99 = percentiles(s.latencies_ms)
        lines.append(
            f"| {m.index} | {m.sent / 60:.1f} | {len(s.latencies_ms) / 60:.1f} | {p50:.1f} "
            f"| {p95:.1f} | {p99:.1f} | {s.count('ok')} | {s.count('expected')} "
            f"| {s.count('unexpected')} | {m.gateway_mb:.1f} | {m.worker_mb:.1f} | {lag(m)} |"
        )
    return "\n".join(lines)


# Memory


@dataclass(frozen=True)
class Memory:
    process: str
    start_mb: float  # at the end of the warm-up
    end_mb: float
    slope_mb_min: float  # least squares over the samples after the warm-up

    @property
    def growth_mb(self) -> float:
        return self.end_mb - self.start_mb

    @property
    def growth_pct(self) -> float:
        return 100 * self.growth_mb / self.start_mb if self.start_mb else 0.0

    @property
    def flat(self) -> bool:
        return self.growth_mb < FLAT_MAX_MB and self.growth_pct < FLAT_MAX_PCT


def memory(samples: Sequence[Sample], warmup_s: float) -> list[Memory]:
    """The gateway's and the worker's verdicts ([] when the run ended before the warm-up)."""
    after = [s for s in samples if s.t_s >= warmup_s - 0.5]
    if len(after) < 2:
        return []
    out = []
    for name in ("gateway", "worker"):

        def mb(s: Sample, name: str = name) -> float:
            value: float = getattr(s, f"{name}_mb")
            return value

        first = [mb(s) for s in samples if warmup_s - FLAT_WINDOW_S <= s.t_s <= warmup_s + 0.5]
        end_t = after[-1].t_s
        last = [mb(s) for s in after if s.t_s >= end_t - FLAT_WINDOW_S]
        slope = statistics.linear_regression([s.t_s / 60 for s in after], [mb(s) for s in after])
        out.append(
            Memory(
                name,
                statistics.median(first or [mb(after[0])]),
                statistics.median(last),
                slope.slope,
            )
        )
    return out


def memory_table(found: Sequence[Memory], warmup_min: int) -> list[str]:
    lines = [
        f"| Process | RSS after warm-up (min {warmup_min}) MB | RSS at the end MB | Growth MB "
        "| Growth % | Trend MB/min | Verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for m in found:
        lines.append(
            f"| {m.process} | {m.start_mb:.1f} | {m.end_mb:.1f} | {m.growth_mb:+.1f} "
            f"| {m.growth_pct:+.1f} | {m.slope_mb_min:+.2f} | {'flat' if m.flat else 'GROWING'} |"
        )
    return lines


# The summary


def kinds_table(by_kind: dict[str, Stats]) -> list[str]:
    lines = [
        "| Kind | Share | Requests | OK | Expected errors | Unexpected | p50 ms | p95 ms "
        "| p99 ms | Served from |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for kind in KINDS:
        s = by_kind[kind.name]
        p50, p95, p99 = percentiles(s.latencies_ms)
        tiers = ", ".join(f"{tier} {n}" for tier, n in sorted(s.cache.items())) or "-"
        lines.append(
            f"| {kind.name} | {kind.weight}% | {len(s.latencies_ms)} | {s.count('ok')} "
            f"| {s.count('expected')} | {s.count('unexpected')} | {p50:.1f} | {p95:.1f} "
            f"| {p99:.1f} | {tiers} |"
        )
    return lines


def totals(outcome: Outcome) -> Stats:
    total = Stats()
    for s in outcome.by_kind.values():
        total.latencies_ms += s.latencies_ms
        total.verdicts += s.verdicts
        total.cache += s.cache
    return total


def unexpected(outcome: Outcome) -> Counter[str]:
    found: Counter[str] = Counter(outcome.run_errors)
    for label, n in totals(outcome).labels("unexpected"):
        found[label] += n
    return found


def summary(outcome: Outcome, warmup_min: int, found: Sequence[Memory]) -> list[str]:
    """The end-of-run report, markdown (it reads as text too)."""
    total = totals(outcome)
    p50, p95, p99 = percentiles(total.latencies_ms)
    lines = [
        "### By kind of request",
        "",
        *kinds_table(outcome.by_kind),
        "",
        f"All: {len(total.latencies_ms)} answered, p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
        f"p99 {p99:.1f} ms (from when each request was due; the sender was at most "
        f"{max((m.max_send_lag_ms for m in outcome.minutes), default=0.0):.1f} ms late).",
        "",
        "### Errors",
        "",
        f"- Expected: {labels(total.labels('expected'))}",
        f"- Unexpected: {labels(unexpected(outcome).most_common())}",
    ]
    health = outcome.final_health
    consolidation = health.get("consolidation") or {}
    recorder = health.get("recorder") or {}
    drained = (
        f"in the database {outcome.drained_s:.1f} s after the load"
        if outcome.drained_s is not None
        else "NOT all in the database after the load"
    )
    lines += [
        f"- Request records: {recorder.get('shipped', '?')} shipped by the gateway, "
        f"{consolidation.get('processed', '?')} consolidated, "
        f"{'?' if outcome.rows is None else outcome.rows} rows in the database, {drained}.",
        "",
        "### Memory (RSS)",
        "",
    ]
    if found:
        lines += memory_table(found, warmup_min)
        lines += [
            "",
            f'"flat": growth from the end of minute {warmup_min} to the end below '
            f"{FLAT_MAX_MB:g} MB and below {FLAT_MAX_PCT:g}% (each end: the median of "
            f"{FLAT_WINDOW_S:g} s of samples).",
        ]
    else:
        lines.append("No verdict: the run ended before the warm-up did.")
    return lines
