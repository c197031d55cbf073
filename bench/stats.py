"""Summaries of repeated samples: median, and p90/p99 for latencies.

Percentiles use the nearest-rank method on the sorted samples: no interpolation, so a reported
p99 is a latency that was actually observed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of `samples`."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, slots=True)
class Summary:
    """What the table and the JSON report for one side of a measure."""

    median: float
    n: int
    p90: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, samples: Sequence[float], *, latency: bool = False) -> Summary:
        if latency:
            return cls(statistics.median(samples), len(samples), percentile(samples, 90), percentile(samples, 99))
        return cls(statistics.median(samples), len(samples))

    def as_dict(self) -> dict[str, float | int | None]:
        return {"median": self.median, "n": self.n, "p90": self.p90, "p99": self.p99}
