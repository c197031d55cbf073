"""A backend's recent error rate: transient failures over the provider calls of a sliding window.

Kept beside the breakers (`Breakers.rates`), told of the same calls: every adapter call that
succeeds or fails transiently. Quota and permanent errors are the job's, not the backend's
health, and count as neither. Per process, like the breakers; no I/O, O(1) amortised per call.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

# The most calls one backend's window remembers: a busier window counts only its latest calls,
# which keeps the memory bounded whatever the traffic (and is plenty to judge a rate on).
MAX_CALLS = 10_000


@dataclass(frozen=True, slots=True)
class Recent:
    """Calls and transient failures to one backend within the window."""

    calls: int
    failures: int

    @property
    def rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


@dataclass
class _Window:
    calls: deque[tuple[float, bool]] = field(default_factory=deque)  # (when, failed), oldest first
    failures: int = 0


class ErrorRates:
    """Each backend's calls over the last `window_s` seconds (the policy sets it at each read)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self._by_backend: dict[str, _Window] = {}

    def record(self, backend: str, *, failed: bool, now: float) -> None:
        """One adapter call to `backend` ended: a transient failure, or a success."""
        window = self._by_backend.setdefault(backend, _Window())
        window.calls.append((now, failed))
        window.failures += failed
        if len(window.calls) > MAX_CALLS:
            self._drop_oldest(window)
        self._expire(window, now)

    def recent(self, backend: str, now: float, window_s: float | None = None) -> Recent:
        """The calls and failures of the last `window_s` (this reader's window from now on)."""
        if window_s is not None:
            self.window_s = window_s  # a window made longer fills up again from now
        window = self._by_backend.get(backend)
        if window is None:
            return Recent(0, 0)
        self._expire(window, now)
        if not window.calls:
            del self._by_backend[backend]  # a backend nobody calls costs nothing
            return Recent(0, 0)
        return Recent(len(window.calls), window.failures)

    def _expire(self, window: _Window, now: float) -> None:
        while window.calls and window.calls[0][0] <= now - self.window_s:
            self._drop_oldest(window)

    @staticmethod
    def _drop_oldest(window: _Window) -> None:
        _, failed = window.calls.popleft()
        window.failures -= failed
