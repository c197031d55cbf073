"""What a measure returns: its baseline and our figure, the ratio, the target, and whether it is met.

Every target is a ratio against a baseline from the same run (issue 6), so the direction of the
comparison (`<=` for costs, `>=` for rates) is part of the target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from bench.stats import Summary


@dataclass(frozen=True, slots=True)
class Target:
    op: Literal["<=", ">="]
    ratio: float

    def met(self, ratio: float) -> bool:
        return ratio <= self.ratio if self.op == "<=" else ratio >= self.ratio

    def __str__(self) -> str:
        return f"{'≤' if self.op == '<=' else '≥'} {self.ratio:g}×"


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table. `unit` says what the figures are (ms, MB, jobs/s, circuits/s)."""

    measure: str
    unit: str
    baseline: Summary
    ours: Summary
    target: Target
    baseline_label: str
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    details: list[str] = field(default_factory=list)  # lines printed under the table (a breakdown)

    @property
    def ratio(self) -> float:
        return self.ours.median / self.baseline.median

    @property
    def met(self) -> bool:
        return self.target.met(self.ratio)

    def as_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "unit": self.unit,
            "baseline_label": self.baseline_label,
            "baseline": self.baseline.as_dict(),
            "ours": self.ours.as_dict(),
            "ratio": self.ratio,
            "target": str(self.target),
            "met": self.met,
            "notes": self.notes,
            "extra": self.extra,
            "details": self.details,
        }
