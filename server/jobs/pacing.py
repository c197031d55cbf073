"""Pacing of new jobs to unhealthy backends (adaptive admission), as this process sees them.

The decision is `policy.adaptive`'s; this module gathers its facts from the workers' breakers and
error rates and remembers when each backend last had a job admitted. Per process, like the
breakers: several processes each pace by what they have seen, so together they may admit one job
per interval each.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from qpu_gateway.errors import from_refusal
from qpu_gateway.jobs.breaker import Breakers
from qpu_gateway.policy.adaptive import Health, check_pace, pace_for
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import AdaptiveAdmission

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Slot:
    """One admission taken from a backend's pace."""

    backend: str
    taken_at: float
    before: float | None  # the admission before it


class Pacing:
    """When a job to each backend was last admitted here, to pace the backends that are failing."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}  # backend -> time.monotonic() of its last admission

    def check(self, settings: AdaptiveAdmission, breakers: Breakers, backend: str) -> None:
        """Raise `rate_limited` saying why if a new job to `backend` comes too soon now."""
        self._check(settings, breakers, backend, time.monotonic())

    def take(self, settings: AdaptiveAdmission, breakers: Breakers, backend: str) -> Slot:
        """Admit one new job to `backend` now, or raise `rate_limited`.

        Nothing awaits between the check and the claim, so two calls in this process never take one slot."""
        now = time.monotonic()
        self._check(settings, breakers, backend, now)
        slot = Slot(backend, now, self._last.get(backend))
        self._last[backend] = now
        return slot

    def give_back(self, slot: Slot) -> None:
        """The job of `slot` was not queued after all: the next one need not wait for it."""
        if self._last.get(slot.backend) != slot.taken_at:
            return  # a later admission has taken the pace since: it stands
        if slot.before is None:
            del self._last[slot.backend]
        else:
            self._last[slot.backend] = slot.before

    def _check(self, settings: AdaptiveAdmission, breakers: Breakers, backend: str, now: float) -> None:
        refusal = self._refusal(settings, breakers, backend, now)
        if refusal is not None:
            log.info(
                "adaptive admission: %s paced",
                backend,
                extra={"backend": backend, "retry_after_s": round(refusal.retry_after_s or 0, 3)},
            )
            raise from_refusal(refusal)

    def _refusal(self, settings: AdaptiveAdmission, breakers: Breakers, backend: str, now: float) -> Refusal | None:
        if not settings.enabled:
            return None
        recent = breakers.rates.recent(backend, now, settings.window)
        health = Health(
            backend=backend,
            breaker=breakers.state(backend),
            failures_in_row=breakers.failures(backend),
            calls=recent.calls,
            failures=recent.failures,
            window_s=settings.window,
        )
        return check_pace(pace_for(settings, health), self._last.get(backend), now)
