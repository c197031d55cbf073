"""Storm alerts: an agent whose calls are being refused in bulk is probably stuck in a loop.

Rate limits and budgets already stop such an agent from doing harm; the alert is for the people
who run the gateway, so they can look at (and perhaps revoke) the agent's key. The decision is
pure: `StormWatch.refused` is told of each refused call and says when to raise the alert, at
most once per agent per window.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from qpu_gateway.policy.file import StormAlert


@dataclass(frozen=True)
class Storm:
    """An alert to raise: who, how many refusals in how long, and of which codes."""

    agent: str
    refused: int
    window_s: float
    codes: dict[str, int]

    def describe(self) -> str:
        kinds = ", ".join(f"{code} x{n}" for code, n in sorted(self.codes.items(), key=lambda kv: -kv[1]))
        return f"{self.refused} refused calls in {self.window_s:g} s ({kinds})"


@dataclass
class _Agent:
    refusals: deque[tuple[float, str]] = field(default_factory=deque)
    alerted_at: float | None = None


class StormWatch:
    """Counts each agent's refused calls in a moving window; one alert per agent per window."""

    def __init__(self) -> None:
        self._agents: dict[str, _Agent] = {}

    def refused(self, agent: str, code: str, now: float, rule: StormAlert) -> Storm | None:
        seen = self._agents.setdefault(agent, _Agent())
        window_s = rule.window_seconds
        seen.refusals.append((now, code))
        while seen.refusals and seen.refusals[0][0] <= now - window_s:
            seen.refusals.popleft()
        # Bounded memory however hard the agent loops: only the threshold's worth is needed.
        while len(seen.refusals) > rule.refused_calls:
            seen.refusals.popleft()
        if len(seen.refusals) < rule.refused_calls:
            return None
        if seen.alerted_at is not None and now - seen.alerted_at < window_s:
            return None
        seen.alerted_at = now
        codes = Counter(code for _, code in seen.refusals)
        return Storm(agent=agent, refused=len(seen.refusals), window_s=window_s, codes=dict(codes))
