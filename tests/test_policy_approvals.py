"""Approvals: which jobs need a person's yes, which need an operator's, and what happens to a job nobody can price."""

from __future__ import annotations

import pytest

from qpu_gateway.policy.approvals import approval_needed
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import Rules, default_policy_text, parse_policy

# Confirm above $5, an operator above $50 (the shipped default's thresholds).
RULES = Rules.model_validate({"confirm_above_usd": "5.00", "operator_above_usd": "50.00"})


@pytest.mark.parametrize(
    ("micro_usd", "level"),
    [
        (0, None),
        (4_999_999, None),
        (5_000_000, None),  # at the threshold: no question asked
        (5_000_001, "person"),
        (49_999_999, "person"),
        (50_000_000, "person"),
        (50_000_001, "operator"),
        (10**12, "operator"),
    ],
)
def test_the_level_of_approval_follows_the_estimated_cost_around_the_thresholds(
    micro_usd: int, level: str | None
) -> None:
    assert approval_needed(RULES, micro_usd) == level


def test_without_thresholds_no_job_needs_approval() -> None:
    assert approval_needed(Rules(), 10**12) is None


def test_an_operator_threshold_alone_skips_the_persons_level() -> None:
    operator_only = Rules.model_validate({"operator_above_usd": "1"})

    assert approval_needed(operator_only, 1_000_000) is None
    assert approval_needed(operator_only, 1_000_001) == "operator"


def test_a_confirm_threshold_of_zero_asks_for_every_paid_job_but_not_a_free_one() -> None:
    ask_always = Rules.model_validate({"confirm_above_usd": "0"})

    assert approval_needed(ask_always, 0) is None
    assert approval_needed(ask_always, 1) == "person"


def test_a_job_whose_price_is_unknown_needs_an_operator_by_default() -> None:
    assert approval_needed(RULES, None) == "operator"
    assert approval_needed(Rules(), None) == "operator"  # even with no thresholds set


def test_a_job_whose_price_is_unknown_is_refused_when_the_policy_says_so() -> None:
    refusing = Rules(unknown_price="refuse")

    refusal = approval_needed(refusing, None)

    assert isinstance(refusal, Refusal)
    assert (refusal.code, refusal.rule) == ("forbidden", "unknown_price")
    assert "add a price" in refusal.message and "another backend" in refusal.message
    assert approval_needed(refusing, 1) is None  # priced jobs are unaffected


def test_the_shipped_default_asks_a_person_above_five_dollars_and_an_operator_above_fifty() -> None:
    shipped = parse_policy(default_policy_text()).defaults

    assert [approval_needed(shipped, cost) for cost in (5_000_000, 5_000_001, 50_000_001, None)] == [
        None,
        "person",
        "operator",
        "operator",
    ]
