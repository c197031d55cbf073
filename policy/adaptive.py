"""Adaptive admission: new jobs to a backend that is failing are admitted more slowly.

A pure decision over what one process has seen of the backend (its breaker and recent error
rate) and when it last admitted a job to it. The breaker's state comes first:

- open (the backend keeps failing; its queued jobs wait): 1 new job per `open_interval`. Jobs
  are still queued, slowly, rather than refused outright: an agent can line up its work for
  when the backend is back, but cannot pile up a backlog that floods it the moment it is.
- half-open (one probe is trying it): 1 new job per `half_open_interval`.
- closed, with at least `min_calls` calls in the window and at least `error_rate_threshold` of
  them transient failures: 1 new job per `error_rate_interval` at the threshold, longer in
  proportion as the rate rises (twice as long at 100% for a threshold of 50%).
- otherwise healthy: no limit, ever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import AdaptiveAdmission

RULE = "adaptive_admission"


@dataclass(frozen=True, slots=True)
class Health:
    """What this process has seen of one backend lately."""

    backend: str
    breaker: Literal["closed", "open", "half_open"]
    failures_in_row: int  # transient failures since the backend last answered
    calls: int  # adapter calls in the window
    failures: int  # of which transient failures
    window_s: float


@dataclass(frozen=True, slots=True)
class Pace:
    """At most one new job to the backend every `interval_s`, and why, in words for the agent."""

    interval_s: float
    reason: str


def pace_for(settings: AdaptiveAdmission, health: Health) -> Pace | None:
    """How fast new jobs to the backend may be admitted; None: as fast as they come."""
    if not settings.enabled:
        return None
    name, row = health.backend, health.failures_in_row
    if health.breaker == "open":
        return Pace(
            settings.open_interval,
            f"{name} is failing (its breaker opened after {row} provider errors in a row; jobs queued for "
            "it wait until it recovers)",
        )
    if health.breaker == "half_open":
        return Pace(
            settings.half_open_interval,
            f"{name} is recovering from provider errors (breaker half-open after {row} failures in a row)",
        )
    if health.calls < settings.min_calls:
        return None
    rate = health.failures / health.calls
    if rate < settings.error_rate_threshold:
        return None
    return Pace(
        settings.error_rate_interval * rate / settings.error_rate_threshold,
        f"{name} failed {health.failures} of its last {health.calls} provider calls ({rate:.0%} in the last "
        f"{health.window_s:g} s, at or above the {settings.error_rate_threshold:.0%} the policy tolerates)",
    )


def check_pace(pace: Pace | None, last_admitted_at: float | None, now: float) -> Refusal | None:
    """Refuse a new job that comes sooner than `pace` allows after the last one admitted."""
    if pace is None or last_admitted_at is None:
        return None
    wait = last_admitted_at + pace.interval_s - now
    if wait <= 0:
        return None
    return Refusal(
        "rate_limited",
        f"{pace.reason}: the gateway admits 1 new job to it every {round(pace.interval_s, 1):g} s; retry in "
        f"{math.ceil(wait)} s, or use another backend (list_backends).",
        rule=RULE,
        retry_after_s=wait,
    )
