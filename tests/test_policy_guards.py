"""Guards: an agent may not raise its own priority, and the same circuit sent over and over is a loop."""

from __future__ import annotations

import pytest

from qpu_gateway.policy.file import LoopGuard, Rules, default_policy_text, parse_policy
from qpu_gateway.policy.guards import check_loop, check_priority

# -- priority ceiling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ceiling", "allowed", "refused"),
    [
        ("low", ["low"], ["normal", "high"]),
        ("normal", ["low", "normal"], ["high"]),
        ("high", ["low", "normal", "high"], []),
    ],
)
def test_an_agent_may_ask_for_its_ceiling_or_lower_never_higher(
    ceiling: str, allowed: list[str], refused: list[str]
) -> None:
    rules = Rules.model_validate({"priority_ceiling": ceiling})

    for asked in allowed:
        assert check_priority(rules, asked) is None
    for asked in refused:
        refusal = check_priority(rules, asked)
        assert refusal is not None
        assert (refusal.code, refusal.rule) == ("forbidden", "priority_ceiling")
        assert f"up to '{ceiling}'" in refusal.message


@pytest.mark.parametrize("asked", ["urgent", "HIGH", "", "2"])
def test_a_priority_that_is_not_low_normal_or_high_is_an_invalid_argument(asked: str) -> None:
    refusal = check_priority(Rules(priority_ceiling="high"), asked)

    assert refusal is not None
    assert (refusal.code, refusal.rule) == ("invalid_arguments", "priority")
    assert "'low', 'normal' or 'high'" in refusal.message


# -- loop guard ---------------------------------------------------------------------------------------

THREE_IN_TEN = Rules(loop_guard=LoopGuard(max_repeats=3, window_minutes=10))


@pytest.mark.parametrize("earlier", [0, 1, 2])
def test_up_to_max_repeats_of_the_same_circuit_in_the_window_are_admitted(earlier: int) -> None:
    # `earlier` same jobs already in the window: this one is number earlier + 1, at most the third.
    assert check_loop(THREE_IN_TEN, earlier) is None


@pytest.mark.parametrize("earlier", [3, 4, 100])
def test_one_more_than_max_repeats_is_a_loop(earlier: int) -> None:
    refusal = check_loop(THREE_IN_TEN, earlier)

    assert refusal is not None
    assert (refusal.code, refusal.rule) == ("loop_detected", "loop_guard")
    assert refusal.retry_after_s == 600.0  # the whole window
    assert f"{earlier} times in the last 10 minutes (limit 3)" in refusal.message
    assert "list_jobs" in refusal.message


def test_the_shipped_default_allows_fifty_repeats_in_ten_minutes() -> None:
    rules = parse_policy(default_policy_text()).defaults

    assert check_loop(rules, 49) is None
    refusal = check_loop(rules, 50)
    assert refusal is not None and refusal.retry_after_s == 600.0
