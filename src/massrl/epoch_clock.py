"""The clock behind an epoch's seconds and images/s (the epoch line, the logged throughput and
summary.json): training and the online kNN check, not the UMAP pictures of eval.umap_every,
which are for looking at (the first one also waits for umap-learn's compilation)."""

from __future__ import annotations

import time
from typing import Any


class EpochClock:
    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._pictures0 = 0.0

    def start(self, module: Any) -> None:
        self._t0 = time.perf_counter()
        self._pictures0 = getattr(module, "umap_seconds", 0.0)

    def seconds(self, module: Any) -> float:
        """Seconds since start(), less those the module spent drawing UMAP pictures."""
        pictures = getattr(module, "umap_seconds", 0.0) - self._pictures0
        return time.perf_counter() - self._t0 - pictures
