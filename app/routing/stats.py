"""What the router has observed of each deployment: latency EWMA and recent percentiles."""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

EWMA_ALPHA = 0.2
SAMPLES = 200
RECENT = 20


@dataclass(slots=True)
class LatencyStats:
    ewma_s: float | None = None
    # When the last sample came (monotonic); exploration re-measures the stalest.
    observed_at: float = 0.0
    # Time to first byte (first chunk for streams, the whole answer otherwise).
    _ttfb: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))
    _recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))

    def observe(self, latency_s: float, ttfb_s: float | None = None) -> None:
        if self.ewma_s is None:
            self.ewma_s = latency_s
        else:
            self.ewma_s += EWMA_ALPHA * (latency_s - self.ewma_s)
        self._ttfb.append(latency_s if ttfb_s is None else ttfb_s)
        self._recent.append(latency_s)
        self.observed_at = time.monotonic()

    @property
    def typical_s(self) -> float:
        """Median of the recent latencies (0 before any): one slow outlier, such as a
        cold first call, does not lock a deployment out the way it would an average."""
        return statistics.median(self._recent) if self._recent else 0.0

    def ttfb_percentile(self, q: float) -> float | None:
        """The q-quantile of recent time-to-first-byte samples; None until 20 are seen."""
        if len(self._ttfb) < 20:
            return None
        ordered = sorted(self._ttfb)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
