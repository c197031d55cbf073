"""Circuit breakers, one per backend: a backend that keeps failing is left alone for a while.

closed: jobs run. After `threshold` transient failures in a row the breaker opens: the worker
stops claiming jobs for that backend (they wait in the queue; none fails because of it) and a
job mid-retry is handed back. After `cooldown_s` it is half-open: one job goes through as a
probe; its success closes the breaker, its failure opens it again. Each process keeps its own
breakers (they describe what this process has seen of the provider), and beside them each
backend's recent error rate (`rates`, for adaptive admission).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from qpu_gateway.jobs.error_rate import ErrorRates

State = Literal["closed", "open", "half_open"]


@dataclass
class _Breaker:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class Breakers:
    def __init__(self, *, threshold: int, cooldown_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._by_backend: dict[str, _Breaker] = {}
        self._seen: set[str] = set()  # every backend this process ran a job on: its breaker is a metric
        self.rates = ErrorRates()
        # Told of each opening from closed and each closing (not of a failed probe's reopening, which
        # would repeat every cooldown while a provider stays down): the outbox's breaker events.
        self.on_change: Callable[[str, State], None] | None = None

    def states(self) -> dict[str, State]:
        """Each backend this process has run jobs on, and its breaker's state now."""
        return {backend: self.state(backend) for backend in sorted(self._seen | set(self._by_backend))}

    def state(self, backend: str) -> State:
        breaker = self._by_backend.get(backend)
        if breaker is None or breaker.opened_at is None:
            return "closed"
        if time.monotonic() - breaker.opened_at < self.cooldown_s:
            return "open"
        return "half_open"

    def blocked(self) -> list[str]:
        """Backends no job may be claimed for now: open, or half-open with its probe under way."""
        return [
            backend
            for backend, breaker in self._by_backend.items()
            if self.state(backend) == "open" or (self.state(backend) == "half_open" and breaker.probing)
        ]

    def started(self, backend: str) -> None:
        """A job for `backend` was claimed; when half-open, it is the probe."""
        self._seen.add(backend)
        if self.state(backend) == "half_open":
            self._by_backend[backend].probing = True

    def failures(self, backend: str) -> int:
        """Transient failures in a row since the backend last answered."""
        breaker = self._by_backend.get(backend)
        return 0 if breaker is None else breaker.failures

    def success(self, backend: str) -> None:
        breaker = self._by_backend.pop(backend, None)
        self.rates.record(backend, failed=False, now=time.monotonic())
        if breaker is not None and breaker.opened_at is not None and self.on_change is not None:
            self.on_change(backend, "closed")

    def failure(self, backend: str) -> None:
        self.rates.record(backend, failed=True, now=time.monotonic())
        breaker = self._by_backend.setdefault(backend, _Breaker())
        breaker.failures += 1
        if breaker.probing or breaker.failures >= self.threshold:
            opened = breaker.opened_at is None
            breaker.opened_at, breaker.probing = time.monotonic(), False
            if opened and self.on_change is not None:
                self.on_change(backend, "open")

    def is_open(self, backend: str) -> bool:
        return self.state(backend) == "open"
