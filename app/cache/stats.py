"""Cache counters: kept as plain numbers on the request path, read at scrape time."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

TIERS = ("l1", "l2")
LATENCY_SAMPLES = 2048


def _quantile(samples: deque[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(slots=True)
class TierStats:
    hits: int = 0
    misses: int = 0
    hit_seconds: float = 0.0
    # Recent hit lookup times, for the percentiles in GET /metrics/cache.
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_SAMPLES))

    def hit(self, seconds: float) -> None:
        self.hits += 1
        self.hit_seconds += seconds
        self.recent.append(seconds)

    def summary(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        p50, p99 = _quantile(self.recent, 0.5), _quantile(self.recent, 0.99)
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / looked, 4) if looked else None,
            "hit_latency_ms": {
                "mean": round(1000 * self.hit_seconds / self.hits, 4) if self.hits else None,
                "p50": None if p50 is None else round(1000 * p50, 4),
                "p99": None if p99 is None else round(1000 * p99, 4),
            },
        }


@dataclass(slots=True)
class CacheStats:
    l1: TierStats = field(default_factory=TierStats)
    l2: TierStats = field(default_factory=TierStats)
    stores: int = 0
    not_stored: int = 0  # answers refused: errors, cut streams, truncated, too large
    l2_writes: int = 0
    l2_write_failures: int = 0
    corrupt: int = 0
    coalesced: int = 0  # requests that waited for an identical one in this process
    waited_for_replica: int = 0  # ... or for another replica's fill
