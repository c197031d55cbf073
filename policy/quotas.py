"""Quotas: may this job's reservation fit in what the agent and its project have left?

The store gathers the usage inside the admission transaction; this module only decides. Money
is integer micro-dollars and QPU time integer milliseconds, so every comparison is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import PeriodCaps, Quota
from qpu_gateway.policy.pricing import MICRO_USD_PER_USD, format_usd

PERIODS = ("day", "month", "total")
Dimension = Literal["cost", "shots", "qpu"]
DIMENSIONS: tuple[Dimension, ...] = ("cost", "shots", "qpu")
_UNIT = {"cost": "USD", "shots": "shots", "qpu": "QPU-seconds"}


@dataclass(frozen=True, slots=True)
class Amounts:
    """One job's (or a sum of jobs') cost in micro-dollars, shots, and QPU time in milliseconds."""

    cost: int = 0
    shots: int = 0
    qpu: int = 0

    def get(self, dimension: Dimension) -> int:
        return int(getattr(self, dimension))


@dataclass(frozen=True, slots=True)
class Usage:
    """What one agent or project has used: committed and reserved amounts per period, and job counts."""

    committed: dict[str, Amounts] = field(default_factory=dict)  # period -> amounts
    reserved: dict[str, Amounts] = field(default_factory=dict)
    queued_jobs: int = 0
    running_jobs: int = 0

    def used(self, period: str, dimension: Dimension) -> int:
        return self.committed.get(period, Amounts()).get(dimension) + self.reserved.get(period, Amounts()).get(
            dimension
        )


def cap_units(caps: PeriodCaps, period: str, dimension: Dimension) -> int | None:
    """A period cap in the ledger's integer units (micro-dollars, shots, milliseconds)."""
    value: Decimal | None = getattr(caps, period)
    if value is None:
        return None
    if dimension == "cost":
        return int(value * MICRO_USD_PER_USD)
    if dimension == "qpu":
        return int(value * 1000)
    return int(value)


def caps_of(quota: Quota, dimension: Dimension) -> PeriodCaps:
    return {"cost": quota.cost_usd, "shots": quota.shots, "qpu": quota.qpu_seconds}[dimension]


def render(dimension: Dimension, units: int) -> str:
    if dimension == "cost":
        return format_usd(units)
    if dimension == "qpu":
        return f"{units / 1000:g} QPU-seconds"
    return f"{units} shots"


def check_quota(quota: Quota, usage: Usage, job: Amounts, *, whose: str) -> Refusal | None:
    """The first cap the job would break for `whose` ('your' or 'your project's'), or None."""
    if quota.queued_jobs is not None and usage.queued_jobs + 1 > quota.queued_jobs:
        return Refusal(
            "quota_exhausted",
            f"{whose.capitalize()} {usage.queued_jobs} waiting jobs reach the cap of {quota.queued_jobs}. "
            "Wait for some to finish (wait_for_job) or cancel ones you no longer need.",
            rule=f"{'project' if 'project' in whose else 'agent'}_quota.queued_jobs",
            retry_after_s=30.0,
        )
    for dimension in DIMENSIONS:
        caps = caps_of(quota, dimension)
        for period in PERIODS:
            cap = cap_units(caps, period, dimension)
            if cap is None:
                continue
            used = usage.used(period, dimension)
            if used + job.get(dimension) > cap:
                left = max(cap - used, 0)
                when = {"day": "today (UTC)", "month": "this month (UTC)", "total": "in total"}[period]
                return Refusal(
                    "quota_exhausted",
                    f"This job needs {render(dimension, job.get(dimension))}, but {whose} {_UNIT[dimension]} quota "
                    f"{when} has {render(dimension, left)} left of {render(dimension, cap)}. Use a cheaper or "
                    "smaller job, a simulator, or ask the operator to raise the quota.",
                    rule=f"{'project' if 'project' in whose else 'agent'}_quota.{_field(dimension)}.{period}",
                )
    return None


def _field(dimension: Dimension) -> str:
    return {"cost": "cost_usd", "shots": "shots", "qpu": "qpu_seconds"}[dimension]


def may_start(quota: Quota, running: int) -> bool:
    """Whether one more job may start while `running` are running (the running_jobs cap)."""
    return quota.running_jobs is None or running < quota.running_jobs
