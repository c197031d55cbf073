"""Quotas: a job is admitted only if it fits what the agent (and its project) has left, to the micro-dollar."""

from __future__ import annotations

import pytest

from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import Quota
from qpu_gateway.policy.quotas import Amounts, Usage, cap_units, check_quota, may_start

DOLLAR = 1_000_000
NOTHING = Amounts()


def quota(**caps: object) -> Quota:
    return Quota.model_validate(caps)


def used(period: str, *, committed: Amounts = NOTHING, reserved: Amounts = NOTHING) -> Usage:
    return Usage(committed={period: committed}, reserved={period: reserved})


def refused(q: Quota, usage: Usage, job: Amounts, whose: str = "your") -> Refusal:
    refusal = check_quota(q, usage, job, whose=whose)
    assert refusal is not None, "the job was admitted"
    return refusal


# -- cost ---------------------------------------------------------------------------------------------


def test_a_job_that_fits_the_budget_exactly_is_admitted_and_one_micro_dollar_more_is_refused() -> None:
    daily_ten = quota(cost_usd={"day": "10.00"})
    usage = used("day", committed=Amounts(cost=6 * DOLLAR), reserved=Amounts(cost=1_500_000))

    assert check_quota(daily_ten, usage, Amounts(cost=2_500_000), whose="your") is None
    refusal = refused(daily_ten, usage, Amounts(cost=2_500_001))

    assert (refusal.code, refusal.rule) == ("quota_exhausted", "agent_quota.cost_usd.day")
    assert "your USD quota today (UTC) has $2.50 left of $10.00" in refusal.message
    assert "simulator" in refusal.message  # what to do next


@pytest.mark.parametrize(
    ("period", "said"), [("day", "today (UTC)"), ("month", "this month (UTC)"), ("total", "in total")]
)
def test_each_period_of_the_cost_quota_is_checked_against_that_periods_usage(period: str, said: str) -> None:
    q = quota(cost_usd={period: "100"})
    usage = used(period, committed=Amounts(cost=90 * DOLLAR))

    assert check_quota(q, usage, Amounts(cost=10 * DOLLAR), whose="your") is None
    refusal = refused(q, usage, Amounts(cost=10 * DOLLAR + 1))

    assert refusal.rule == f"agent_quota.cost_usd.{period}"
    assert f"{said} has $10.00 left of $100.00" in refusal.message


def test_usage_of_another_period_does_not_count_against_a_cap() -> None:
    daily = quota(cost_usd={"day": "1"})
    spent_this_month = Usage(committed={"day": Amounts(), "month": Amounts(cost=500 * DOLLAR)})

    assert check_quota(daily, spent_this_month, Amounts(cost=DOLLAR), whose="your") is None


def test_reserved_money_counts_as_spent_until_it_is_released() -> None:
    q = quota(cost_usd={"total": "1"})

    refusal = refused(q, used("total", reserved=Amounts(cost=DOLLAR)), Amounts(cost=1))

    assert "has $0.00 left of $1.00" in refusal.message


def test_an_overdrawn_quota_says_nothing_is_left_not_a_negative_amount() -> None:
    refusal = refused(quota(cost_usd={"day": "1"}), used("day", committed=Amounts(cost=3 * DOLLAR)), Amounts(cost=1))

    assert "has $0.00 left of $1.00" in refusal.message


# -- shots and QPU time -------------------------------------------------------------------------------


@pytest.mark.parametrize("period", ["day", "month", "total"])
def test_a_shot_quota_admits_up_to_its_cap_and_says_how_many_shots_are_left(period: str) -> None:
    q = quota(shots={period: 100_000})
    usage = used(period, committed=Amounts(shots=60_000), reserved=Amounts(shots=30_000))

    assert check_quota(q, usage, Amounts(shots=10_000), whose="your") is None
    refusal = refused(q, usage, Amounts(shots=10_001))

    assert (refusal.code, refusal.rule) == ("quota_exhausted", f"agent_quota.shots.{period}")
    assert "needs 10001 shots" in refusal.message
    assert "has 10000 shots left of 100000 shots" in refusal.message


@pytest.mark.parametrize("period", ["day", "month", "total"])
def test_a_qpu_time_quota_counts_in_milliseconds_and_speaks_in_seconds(period: str) -> None:
    q = quota(qpu_seconds={period: "60"})
    usage = used(period, committed=Amounts(qpu=50_000))

    assert cap_units(q.qpu_seconds, period, "qpu") == 60_000
    assert check_quota(q, usage, Amounts(qpu=10_000), whose="your") is None
    refusal = refused(q, usage, Amounts(qpu=10_001))

    assert refusal.rule == f"agent_quota.qpu_seconds.{period}"
    assert "needs 10.001 QPU-seconds" in refusal.message
    assert "has 10 QPU-seconds left of 60 QPU-seconds" in refusal.message


def test_the_first_cap_a_job_breaks_is_reported_cost_before_shots_before_qpu_time() -> None:
    q = quota(cost_usd={"month": "1"}, shots={"day": 10}, qpu_seconds={"total": "1"})
    too_much = Amounts(cost=2 * DOLLAR, shots=20, qpu=2_000)

    assert refused(q, Usage(), too_much).rule == "agent_quota.cost_usd.month"
    assert refused(q, Usage(), Amounts(shots=20, qpu=2_000)).rule == "agent_quota.shots.day"
    assert refused(q, Usage(), Amounts(qpu=2_000)).rule == "agent_quota.qpu_seconds.total"


def test_no_caps_admit_anything() -> None:
    huge = Amounts(cost=10**12, shots=10**9, qpu=10**9)

    assert check_quota(Quota(), used("total", committed=huge), huge, whose="your") is None


# -- job counts ---------------------------------------------------------------------------------------


def test_the_queued_jobs_cap_admits_the_last_free_place_and_then_refuses() -> None:
    q = quota(queued_jobs=3)

    assert check_quota(q, Usage(queued_jobs=2), Amounts(), whose="your") is None
    refusal = refused(q, Usage(queued_jobs=3), Amounts())

    assert (refusal.code, refusal.rule, refusal.retry_after_s) == ("quota_exhausted", "agent_quota.queued_jobs", 30.0)
    assert refusal.message.startswith("Your 3 waiting jobs reach the cap of 3.")
    assert "cancel" in refusal.message


def test_a_projects_quota_is_named_as_the_projects() -> None:
    queued = refused(quota(queued_jobs=0), Usage(), Amounts(), whose="your project's")
    cost = refused(quota(cost_usd={"day": "0"}), Usage(), Amounts(cost=1), whose="your project's")

    assert queued.rule == "project_quota.queued_jobs"
    assert queued.message.startswith("Your project's 0 waiting jobs")
    assert cost.rule == "project_quota.cost_usd.day"
    assert "your project's USD quota today (UTC) has $0.00 left" in cost.message


def test_running_jobs_do_not_count_against_the_queued_cap() -> None:
    assert check_quota(quota(queued_jobs=1), Usage(queued_jobs=0, running_jobs=50), Amounts(), whose="your") is None


@pytest.mark.parametrize(("running", "may"), [(0, True), (1, True), (2, False), (3, False)])
def test_may_start_holds_a_job_while_the_running_cap_is_reached(running: int, may: bool) -> None:
    assert may_start(quota(running_jobs=2), running) is may


def test_may_start_without_a_running_cap_always_allows_and_a_cap_of_zero_never_does() -> None:
    assert may_start(Quota(), 10_000) is True
    assert may_start(quota(running_jobs=0), 0) is False
