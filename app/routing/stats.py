"""What the router has observed of each deployment: latency EWMA and recent percentiles."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

EWMA_ALPHA = 0.2
SAMPLES = 200


@dataclass(slots=True)
class LatencyStats:
    ewma_s: float | None = None
    # Time to first byte (first chunk for streams, the whole answer otherwise).
    _ttfb: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES))

    def observe(self, latency_s: float, ttfb_s: float | None = None) -> None:
        if self.ewma_s is None:
            self.ewma_s = latency_s
        else:
            self.ewma_s += EWMA_ALPHA * (latency_s - self.ewma_s)
        self._ttfb.append(latency_s if ttfb_s is None else ttfb_s)

    def ttfb_percentile(self, q: float) -> float | None:
        """The q-quantile of recent time-to-first-byte samples; None until 20 are seen."""
        if len(self._ttfb) < 20:
            return None
        ordered = sorted(self._ttfb)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
