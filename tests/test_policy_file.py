"""The policy file's levels and its refusals: defaults, then a project, then an agent; every mistake named by line."""

from __future__ import annotations

from decimal import Decimal

import pytest

from qpu_gateway.policy.file import (
    LoopGuard,
    PeriodCaps,
    Policy,
    PolicyFileError,
    Quota,
    RateRule,
    Rules,
    parse_duration,
    parse_policy,
)

# One file with all three levels: the lab project tightens the defaults, and carol (in the lab)
# tightens them again for herself.
LAYERED = """\
[defaults]
allowed_backends = ["aer/*", "ibm/*"]
max_shots = 10000
max_qubits = 20
rate_limits = [{ limit = "60/minute" }]
agent_quota = { cost_usd = { day = "10.00" }, queued_jobs = 200 }
project_quota = { cost_usd = { month = "1000" } }
loop_guard = { max_repeats = 50, window_minutes = 10 }

[projects.lab]
allowed_backends = ["aer/*"]
max_shots = 5000
rate_limits = [{ limit = "5/second", per = "project" }, { limit = "100/hour", cost = "shots" }]
agent_quota = { cost_usd = { month = "100.00" } }
project_quota = { shots = { day = 1000000 } }
loop_guard = { window_minutes = 30 }
priority_ceiling = "high"

[agents.carol]
max_shots = 100
agent_quota = { queued_jobs = 5 }
loop_guard = { max_repeats = 3 }
priority_ceiling = "low"
simulate_first = true
"""


@pytest.fixture(scope="module")
def layered() -> Policy:
    return parse_policy(LAYERED, path="policy.toml")


def reason(text: str) -> str:
    with pytest.raises(PolicyFileError) as error:
        parse_policy(text, path="policy.toml")
    return str(error.value)


# -- levels -------------------------------------------------------------------------------------------


def test_an_agent_outside_any_named_project_gets_the_defaults(layered: Policy) -> None:
    rules = layered.rules_for(agent="alice", project="default")

    assert rules == layered.defaults
    assert (rules.max_shots, rules.allowed_backends, rules.priority_ceiling) == (10_000, ("aer/*", "ibm/*"), "normal")


def test_a_project_overrides_the_defaults_and_keeps_what_it_does_not_set(layered: Policy) -> None:
    rules = layered.rules_for(agent="alice", project="lab")

    assert (rules.max_shots, rules.priority_ceiling) == (5_000, "high")
    assert rules.max_qubits == 20  # not set by the project


def test_an_agent_overrides_its_project(layered: Policy) -> None:
    rules = layered.rules_for(agent="carol", project="lab")

    assert (rules.max_shots, rules.priority_ceiling, rules.simulate_first) == (100, "low", True)
    assert rules.allowed_backends == ("aer/*",)  # from the project
    assert rules.max_qubits == 20  # from the defaults


def test_an_agents_own_section_applies_in_whatever_project_it_works(layered: Policy) -> None:
    rules = layered.rules_for(agent="carol", project="default")

    assert (rules.max_shots, rules.priority_ceiling) == (100, "low")
    assert rules.allowed_backends == ("aer/*", "ibm/*")


def test_tables_merge_key_by_key_across_the_levels(layered: Policy) -> None:
    rules = layered.rules_for(agent="carol", project="lab")

    assert rules.agent_quota == Quota(
        cost_usd=PeriodCaps(day=Decimal("10.00"), month=Decimal("100.00")),  # day from defaults, month from lab
        queued_jobs=5,  # carol's own, over the defaults' 200
    )
    assert rules.loop_guard == LoopGuard(max_repeats=3, window_minutes=30)
    assert rules.project_quota == Quota(
        cost_usd=PeriodCaps(month=Decimal("1000")), shots=PeriodCaps(day=Decimal("1000000"))
    )


def test_lists_are_replaced_not_merged(layered: Policy) -> None:
    rules = layered.rules_for(agent="carol", project="lab")

    assert rules.allowed_backends == ("aer/*",)
    assert rules.rate_limits == (
        RateRule(limit="5/second", per="project"),
        RateRule(limit="100/hour", cost="shots"),
    )
    assert layered.defaults.rate_limits == (RateRule(limit="60/minute"),)


def test_project_rules_are_the_defaults_merged_with_the_project(layered: Policy) -> None:
    lab = layered.project_rules("lab")

    assert (lab.max_shots, lab.priority_ceiling, lab.simulate_first) == (5_000, "high", False)
    assert layered.project_rules("unnamed") == layered.defaults
    assert layered.names == (["lab"], ["carol"])


def test_an_agent_section_may_not_set_its_projects_quota() -> None:
    text = (
        "[defaults]\nmax_qubits = 5\n\n"
        '[agents.mallory]\nmax_shots = 10\nproject_quota = { cost_usd = { day = "1e6" } }\n'
    )

    said = reason(text)

    assert said.startswith("policy.toml: line 6: agents.mallory.project_quota: ")
    assert "[defaults] or [projects.NAME]" in said


def test_a_project_quota_comes_only_from_the_defaults_and_the_project_even_when_built_in_code() -> None:
    policy = Policy(
        {
            "defaults": {"project_quota": {"queued_jobs": 10}},
            "projects": {"lab": {"project_quota": {"running_jobs": 2}}},
            "agents": {"mallory": {"project_quota": {"queued_jobs": 1_000_000}}},
        }
    )

    assert policy.rules_for(agent="mallory", project="lab").project_quota == Quota(queued_jobs=10, running_jobs=2)


# -- mistakes, by line --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            '[defaults]\nmax_depth = 5\n\n[projects.lab]\nmax_qubits = 4\nmax_depth = "deep"\n',
            "line 6: projects.lab.max_depth: Input should be a valid integer",
        ),
        (
            "[defaults]\nmax_qubits = 5\n\n[projects.lab]\nmax_qubits = 4\n\n[agents.bob]\nmax_shots = 0\n",
            "line 8: agents.bob.max_shots: Input should be greater than or equal to 1",
        ),
        (
            '[defaults]\nmax_qubits = 5\n\n[agents.bob]\npriority_ceiling = "urgent"\n',
            "line 5: agents.bob.priority_ceiling: Input should be 'low', 'normal' or 'high'",
        ),
        (
            '[defaults]\nmax_qubits = 5\n\n[agents.bob]\nmax_shots = 10\nrate_limits = [{ limit = "lots" }]\n',
            "line 6: agents.bob.rate_limits.0.limit: Value error, 'lots' is not a rate like '60/minute'",
        ),
        (
            "[defaults]\nmax_qubits = 5\n\n[agents.bob]\nloop_guard = { max_repeats = 0 }\n",
            "line 5: agents.bob.loop_guard.max_repeats: Input should be greater than or equal to 1",
        ),
        (
            '[defaults]\nrate_limits = [{ limit = "1/second" }]\n\n'
            '[projects.lab]\nrate_limits = [{ limit = "5/fortnight" }]\n',
            "line 5: projects.lab.rate_limits.0.limit: Value error, '5/fortnight' is not a rate like '60/minute'",
        ),
    ],
    ids=[
        "project-wrong-type",
        "agent-wrong-value",
        "agent-bad-priority",
        "agent-bad-rate",
        "agent-table-value",
        "project-bad-rate",
    ],
)
def test_a_mistake_in_a_project_or_agent_section_names_its_line_and_key(text: str, said: str) -> None:
    assert said in reason(text)


def test_a_rate_rule_with_an_unknown_key_or_scope_is_refused() -> None:
    assert "defaults.rate_limits.0.per: Input should be" in reason(
        '[defaults]\nrate_limits = [{ limit = "5/minute", per = "planet" }]\n'
    )
    assert "defaults.rate_limits.0.tool: Extra inputs are not permitted" in reason(
        '[defaults]\nrate_limits = [{ limit = "5/minute", tool = "submit_job" }]\n'
    )


def test_a_bad_rate_in_the_second_rule_of_a_multi_line_list_names_that_rules_line() -> None:
    text = '[projects.lab]\nrate_limits = [\n  { limit = "5/second" },\n  { limit = "10 per fortnight" },\n]\n'

    assert "line 4: projects.lab.rate_limits.1.limit: Value error, '10 per fortnight' is not a rate" in reason(text)


# -- money --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[defaults]\nconfirm_above_usd = "0.0000001"\n', "defaults.confirm_above_usd"),
        ("[defaults]\noperator_above_usd = 1.0000005\n", "defaults.operator_above_usd"),
        ('[defaults]\nagent_quota = { cost_usd = { day = "0.0000001" } }\n', "defaults.agent_quota.cost_usd"),
        ('[projects.lab]\nproject_quota = { cost_usd = { total = "9.9999999" } }\n', "projects.lab.project_quota"),
    ],
    ids=["confirm", "operator-float", "agent-quota", "project-quota"],
)
def test_money_finer_than_a_micro_dollar_is_refused(text: str, key: str) -> None:
    said = reason(text)

    assert f"line 2: {key}" in said
    assert "finer than a micro-dollar" in said


def test_money_at_a_whole_micro_dollar_is_kept_exactly() -> None:
    rules = parse_policy(
        '[defaults]\nconfirm_above_usd = "0.000001"\noperator_above_usd = 12.5\n'
        'agent_quota = { cost_usd = { day = "10.000001" } }\n'
    ).defaults

    assert (rules.micro("confirm_above_usd"), rules.micro("operator_above_usd")) == (1, 12_500_000)
    assert rules.agent_quota.cost_usd.day == Decimal("10.000001")


@pytest.mark.parametrize(
    "text",
    ['[defaults]\nconfirm_above_usd = "-1"\n', "[defaults]\nconfirm_above_usd = true\n"],
    ids=["negative", "bool"],
)
def test_a_threshold_must_be_a_non_negative_amount(text: str) -> None:
    assert "defaults.confirm_above_usd" in reason(text)


# -- durations, ints and bools ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"), [("90s", 90), ("30m", 1_800), ("24h", 86_400), ("7d", 604_800), ("2 h", 7_200), (45, 45)]
)
def test_durations_take_a_unit_or_plain_seconds(value: str | int, seconds: int) -> None:
    assert parse_duration(value) == seconds


def test_approval_ttl_is_read_as_a_duration() -> None:
    assert parse_policy('[defaults]\napproval_ttl = "24h"\n').defaults.approval_ttl == 86_400
    assert parse_policy('[agents.bob]\napproval_ttl = "15m"\n').rules_for(agent="bob", project="x").approval_ttl == 900


@pytest.mark.parametrize("value", ['"0h"', '"24"', '"1w"', '"-5m"', '"1.5h"', "0", "-3", "true", "1.5"])
def test_a_duration_without_a_positive_whole_number_and_a_known_unit_is_refused(value: str) -> None:
    said = reason(f"[defaults]\napproval_ttl = {value}\n")

    assert "line 2: defaults.approval_ttl" in said
    assert "90s, 30m, 24h, 7d" in said


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[defaults]\nsimulate_first = 1\n", "defaults.simulate_first"),
        ('[defaults]\nsimulate_first = "true"\n', "defaults.simulate_first"),
        ("[defaults]\nloop_guard = { max_repeats = 5.0 }\n", "defaults.loop_guard.max_repeats"),
        ('[defaults]\nloop_guard = { window_minutes = "10" }\n', "defaults.loop_guard.window_minutes"),
        ("[defaults]\nagent_quota = { running_jobs = true }\n", "defaults.agent_quota.running_jobs"),
        ('[defaults]\nagent_quota = { queued_jobs = "200" }\n', "defaults.agent_quota.queued_jobs"),
        ("[defaults]\nagent_quota = { cost_usd = { day = true } }\n", "defaults.agent_quota.cost_usd.day"),
        ("[defaults]\nagent_quota = { running_jobs = -1 }\n", "defaults.agent_quota.running_jobs"),
    ],
    ids=[
        "int-for-bool",
        "string-for-bool",
        "float-repeats",
        "string-window",
        "bool-running",
        "string-queued",
        "bool-cap",
        "negative-running",
    ],
)
def test_ints_and_bools_are_strict(text: str, key: str) -> None:
    assert f"line 2: {key}: " in reason(text)


def test_rules_built_in_code_are_as_strict_as_the_file() -> None:
    with pytest.raises(ValueError, match="simulate_first"):
        Rules.model_validate({"simulate_first": "yes"})
    with pytest.raises(ValueError, match="max_repeats"):
        Rules.model_validate({"loop_guard": {"max_repeats": "3"}})


# -- operator-written prices, and mistakes the file must name rather than crash on --------------------


def test_a_price_in_the_file_replaces_or_adds_to_the_shipped_table() -> None:
    policy = parse_policy(
        '[prices."ibm/*"]\nmodel = "per_qpu_second"\nper_second_usd = "0.50"\n\n'
        '[prices."lab/qpu"]\nmodel = "per_task_shot"\nper_task_usd = "1"\nper_shot_usd = "0.01"\n'
    )

    assert policy.prices["ibm/*"].figures == {"per_second_usd": Decimal("0.50")}
    assert policy.prices["lab/qpu"].known
    assert policy.prices["braket/iqm_garnet"].figures["per_shot_usd"] == Decimal("0.00145")  # shipped, untouched


def test_a_price_with_a_bad_amount_is_a_policy_file_error_naming_the_entry() -> None:
    said = reason('[prices."lab/*"]\nmodel = "per_task_shot"\nper_task_usd = "abc"\nper_shot_usd = "1"\n')

    assert "price 'lab/*'.per_task_usd: 'abc' is not an amount in USD" in said


def test_a_price_that_is_not_a_table_is_a_policy_file_error() -> None:
    said = reason('[prices]\n"lab/*" = 5\n')

    assert "lab/*" in said


@pytest.mark.parametrize("dimension", ["cost_usd", "shots", "qpu_seconds"])
def test_a_quota_cap_that_is_not_a_number_is_a_policy_file_error(dimension: str) -> None:
    said = reason(f'[defaults]\nagent_quota = {{ {dimension} = {{ day = "ten" }} }}\n')

    assert f"line 2: defaults.agent_quota.{dimension}.day" in said


@pytest.mark.parametrize("dimension", ["shots", "qpu_seconds"])
def test_a_negative_quota_cap_is_refused(dimension: str) -> None:
    said = reason(f"[defaults]\nagent_quota = {{ {dimension} = {{ day = -5 }} }}\n")

    assert f"line 2: defaults.agent_quota.{dimension}.day" in said


# -- the wall-clock cap ------------------------------------------------------------------------------


def test_the_wall_clock_cap_is_the_exact_id_else_the_longest_pattern_else_a_day() -> None:
    rules = parse_policy(
        '[defaults]\nmax_wall_clock = { "ibm/*" = "8h", "ibm/ibm_kyiv" = "30m", "ibm/ibm_*" = "2h" }\n'
    ).defaults
    assert rules.wall_clock_s("ibm/ibm_kyiv") == 1_800
    assert rules.wall_clock_s("ibm/ibm_fez") == 7_200  # "ibm/ibm_*" is longer than "ibm/*"
    assert rules.wall_clock_s("ibm/fake_manila") == 28_800
    assert rules.wall_clock_s("braket/sv1") == 86_400  # "*" added when the table leaves it out
    assert rules.max_wall_clock["*"] == 86_400
    assert Rules().wall_clock_s("azure/ionq.qpu.aria-1") == 86_400  # no max_wall_clock at all


def test_an_agents_wall_clock_entries_merge_over_the_defaults() -> None:
    policy = parse_policy(
        '[defaults]\nmax_wall_clock = { "*" = "12h", "ibm/*" = "8h" }\n'
        '[agents.bob]\nmax_wall_clock = { "ibm/*" = 600 }\n'
    )
    bob = policy.rules_for(agent="bob", project="default")
    assert bob.max_wall_clock == {"*": 43_200, "ibm/*": 600}
    assert policy.rules_for(agent="alice", project="default").wall_clock_s("ibm/x") == 28_800


@pytest.mark.parametrize(
    ("text", "said"),
    [
        (
            '[defaults]\nmax_shots = 10\nmax_wall_clock = { "ibm/*" = "8 hours" }\n',
            "line 3: defaults.max_wall_clock.ibm/*: Value error, a duration is a positive number with a unit",
        ),
        (
            '[agents.bob]\nmax_wall_clock = { "*" = "1h", "braket/*" = 0 }\n',
            "line 2: agents.bob.max_wall_clock.braket/*: Value error, a duration is a positive number",
        ),
        ('[defaults]\nmax_wall_clock = "8h"\n', "line 2: defaults.max_wall_clock: Input should be a valid dictionary"),
        ('[defaults]\nmax_wall_clock = { " " = "1h" }\n', "is not a backend id or pattern"),
    ],
    ids=["not-a-duration", "zero", "not-a-table", "blank-pattern"],
)
def test_a_bad_wall_clock_entry_names_its_line_and_key(text: str, said: str) -> None:
    assert said in reason(text)
