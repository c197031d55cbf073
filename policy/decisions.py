"""The values a policy decision returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the policy turns away: a stable `code` and a message saying what to do next."""

    code: str
    message: str
    rule: str
    retry_after_s: float | None = None
