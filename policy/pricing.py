"""Price models per backend and cost estimates, in integer micro-dollars.

Money is never a float here: 1 USD = 1_000_000 micro-dollars, so sums of many small charges
stay exact and a ledger can be compared to the cent without rounding surprises.
"""

from __future__ import annotations

from dataclasses import dataclass

MICRO_USD_PER_USD = 1_000_000


@dataclass(frozen=True, slots=True)
class PriceModel:
    """How a backend charges: a fixed fee per task (one circuit run) plus a fee per shot."""

    per_task_micro_usd: int
    per_shot_micro_usd: int

    def describe(self) -> str:
        if self.per_task_micro_usd == 0 and self.per_shot_micro_usd == 0:
            return "free"
        return (
            f"${self.per_task_micro_usd / MICRO_USD_PER_USD:.4f} per task + "
            f"${self.per_shot_micro_usd / MICRO_USD_PER_USD:.6f} per shot"
        )


# The local simulators run on this machine and cost nothing.
FREE = PriceModel(per_task_micro_usd=0, per_shot_micro_usd=0)


def estimate_cost_micro_usd(model: PriceModel, *, shots: int, circuits: int) -> int:
    """Cost of running `circuits` circuits of `shots` shots each: one task per circuit."""
    return circuits * (model.per_task_micro_usd + shots * model.per_shot_micro_usd)


def format_usd(micro_usd: int) -> str:
    """Render micro-dollars as a dollar string for people (never used for arithmetic)."""
    return f"${micro_usd / MICRO_USD_PER_USD:,.2f}"
