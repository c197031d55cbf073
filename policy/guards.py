"""Guards against agent loops and priority abuse: pure checks over counts the store provides."""

from __future__ import annotations

from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import PRIORITY_RANK, Rules


def check_priority(rules: Rules, asked: str) -> Refusal | None:
    """An agent may ask for its ceiling or lower, never higher."""
    if asked not in PRIORITY_RANK:
        return Refusal("invalid_arguments", "priority must be 'low', 'normal' or 'high'.", rule="priority")
    if PRIORITY_RANK[asked] > PRIORITY_RANK[rules.priority_ceiling]:
        return Refusal(
            "forbidden",
            f"Your policy allows priority up to '{rules.priority_ceiling}'; ask for that or lower.",
            rule="priority_ceiling",
        )
    return None


def check_loop(rules: Rules, repeats: int) -> Refusal | None:
    """`repeats`: jobs of this agent with the same circuit on the same backend within the window."""
    guard = rules.loop_guard
    if repeats + 1 > guard.max_repeats:
        return Refusal(
            "loop_detected",
            f"You submitted this same circuit to this backend {repeats} times in the last "
            f"{guard.window_minutes} minutes (limit {guard.max_repeats}). If you are retrying, stop and read the "
            "earlier jobs' results with list_jobs/get_job; change the circuit if you meant a new experiment.",
            rule="loop_guard",
            retry_after_s=60.0 * guard.window_minutes,
        )
    return None
