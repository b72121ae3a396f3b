"""The operator dashboard's files: plain HTML, CSS and JavaScript modules, no build step.

Every figure they show is fetched from the gateway's public endpoints (metrics, admin,
virtual-cycle, feedback), so the API stays the one source of truth. `static/vendor`
holds uPlot (MIT), fetched by `scripts/vendor_dashboard.sh` at a pinned checksum.
"""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
