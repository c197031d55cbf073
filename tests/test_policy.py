"""Policy: the per-job caps admission checks, the policy file that sets them, and what a job costs."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from qpu_gateway.policy.admission import JobFacts, check_job
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import (
    LoopGuard,
    PolicyFileError,
    Quota,
    RateRule,
    Rules,
    default_policy_text,
    load_policy,
    parse_policy,
)
from qpu_gateway.policy.pricing import JobShape, Price, estimate_cost, format_usd

RULES = Rules(
    allowed_backends=("aer/*", "ibm/ibm_torino"),
    max_qubits=20,
    max_depth=500,
    max_shots=10_000,
    max_circuits=50,
)

# A job that fits every cap in RULES; each test breaks one thing.
FITS = JobFacts(
    backend="aer/simulator",
    shots=1_000,
    circuits=3,
    max_qubits=5,
    max_depth=40,
    backend_qubits=30,
    backend_max_shots=None,
)


def refusal_of(job: JobFacts, rules: Rules = RULES) -> tuple[str, str]:
    refusal = check_job(rules, job)
    assert isinstance(refusal, Refusal), "the job was admitted"
    return refusal.code, refusal.rule


# -- admission ----------------------------------------------------------------------------------------


def test_a_job_that_fits_every_cap_is_admitted() -> None:
    assert check_job(RULES, FITS) is None


def test_a_job_exactly_at_every_cap_is_admitted() -> None:
    at_caps = replace(FITS, shots=10_000, circuits=50, max_qubits=20, max_depth=500, backend_qubits=20)

    assert check_job(RULES, at_caps) is None


@pytest.mark.parametrize("backend", ["aer/simulator", "aer/statevector", "ibm/ibm_torino"])
def test_backends_matching_an_allowed_pattern_are_admitted(backend: str) -> None:
    assert check_job(RULES, replace(FITS, backend=backend)) is None


@pytest.mark.parametrize("backend", ["ibm/ibm_kyiv", "braket/sv1", "AER/simulator", "aer", "xaer/simulator"])
def test_a_backend_outside_the_allowed_patterns_is_forbidden(backend: str) -> None:
    refusal = check_job(RULES, replace(FITS, backend=backend))

    assert refusal is not None
    assert (refusal.code, refusal.rule) == ("forbidden", "allowed_backends")
    assert backend in refusal.message and "list_backends" in refusal.message


def test_too_many_circuits_in_one_job_is_a_limit() -> None:
    assert refusal_of(replace(FITS, circuits=51)) == ("limit_exceeded", "max_circuits")


@pytest.mark.parametrize("shots", [0, -1, 10_001])
def test_shots_outside_one_to_the_policy_cap_are_a_limit(shots: int) -> None:
    assert refusal_of(replace(FITS, shots=shots)) == ("limit_exceeded", "max_shots")


def test_a_backend_that_takes_fewer_shots_than_the_policy_lowers_the_cap() -> None:
    ibm = replace(FITS, backend="ibm/ibm_torino", backend_max_shots=4_000)

    assert check_job(RULES, replace(ibm, shots=4_000)) is None
    refusal = check_job(RULES, replace(ibm, shots=4_001))
    assert refusal is not None
    assert (refusal.code, refusal.rule) == ("limit_exceeded", "max_shots")
    assert "between 1 and 4000" in refusal.message


def test_a_backend_that_takes_more_shots_than_the_policy_does_not_raise_the_cap() -> None:
    generous = replace(FITS, backend_max_shots=1_000_000, shots=10_001)

    assert refusal_of(generous) == ("limit_exceeded", "max_shots")


def test_more_qubits_than_the_policy_allows_is_a_limit() -> None:
    assert refusal_of(replace(FITS, max_qubits=21)) == ("limit_exceeded", "max_qubits")


def test_more_qubits_than_the_backend_has_is_a_limit_named_for_the_backend() -> None:
    small_device = replace(FITS, max_qubits=8, backend_qubits=7)

    refusal = check_job(RULES, small_device)

    assert refusal is not None
    assert (refusal.code, refusal.rule) == ("limit_exceeded", "backend_qubits")
    assert "aer/simulator has 7" in refusal.message


def test_a_backend_of_unknown_size_is_limited_only_by_the_policy() -> None:
    assert check_job(RULES, replace(FITS, max_qubits=20, backend_qubits=None)) is None


def test_a_circuit_deeper_than_the_policy_allows_is_a_limit() -> None:
    assert refusal_of(replace(FITS, max_depth=501)) == ("limit_exceeded", "max_depth")


def test_the_first_broken_rule_is_the_one_reported() -> None:
    everything_wrong = replace(
        FITS, backend="braket/sv1", circuits=99, shots=0, max_qubits=99, max_depth=9_999, backend_qubits=1
    )

    assert refusal_of(everything_wrong) == ("forbidden", "allowed_backends")
    assert refusal_of(replace(everything_wrong, backend="aer/simulator")) == ("limit_exceeded", "max_circuits")


# -- the policy file ----------------------------------------------------------------------------------


def test_the_shipped_default_policy_parses_and_is_safe_out_of_the_box() -> None:
    shipped = parse_policy(default_policy_text(), path="<default policy>").defaults

    # Hardware is allowed, but only within a daily budget, behind a per-agent rate limit and
    # with a person's yes above $5 (an operator's above $50).
    assert shipped.allowed_backends == ("aer/*", "ibm/*", "braket/*", "azure/*")
    assert shipped.rate_limits == (
        RateRule(limit="60/minute", per="agent", tools=("submit_job",)),
        RateRule(limit="20/second", per="agent", tools=("*",)),
    )
    assert shipped.agent_quota == Quota.model_validate(
        {"cost_usd": {"day": "10.00"}, "running_jobs": 8, "queued_jobs": 200}
    )
    assert shipped.project_quota == Quota()
    assert (shipped.micro("confirm_above_usd"), shipped.micro("operator_above_usd")) == (5_000_000, 50_000_000)
    assert (shipped.unknown_price, shipped.approval_ttl) == ("operator", 86_400)
    assert (shipped.priority_ceiling, shipped.simulate_first) == ("normal", False)
    assert shipped.loop_guard == LoopGuard(max_repeats=50, window_minutes=10)
    # The per-job caps are the built-in ones; everything above is what the file adds to them.
    caps = ("max_qubits", "max_depth", "max_shots", "max_circuits")
    assert [getattr(shipped, cap) for cap in caps] == [getattr(Rules(), cap) for cap in caps]
    assert shipped != Rules()
    assert (Rules().rate_limits, Rules().agent_quota, Rules().confirm_above_usd) == ((), Quota(), None)


def test_a_partial_policy_file_keeps_the_defaults_for_what_it_leaves_out() -> None:
    policy = parse_policy('[defaults]\nmax_qubits = 5\nallowed_backends = ["aer/*", "ibm/*"]\n')

    assert policy.defaults == Rules(max_qubits=5, allowed_backends=("aer/*", "ibm/*"))
    assert policy.rules_for(agent="alice", project="default") == policy.defaults


def test_a_toml_syntax_error_names_the_file_and_the_line() -> None:
    text = "[defaults]\nmax_qubits = 5\nmax_depth = = 3\n"

    with pytest.raises(PolicyFileError) as error:
        parse_policy(text, path="/etc/qpu/policy.toml")

    assert error.value.path == "/etc/qpu/policy.toml"
    assert "not valid TOML" in str(error.value)
    assert "line 3" in str(error.value)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[defaults]\nmax_qbits = 5\n", "line 2: defaults.max_qbits: Extra inputs are not permitted"),
        ("[default]\nmax_qubits = 5\n", "line 1: unknown section or key 'default'"),
        ("budget = 10\n", "line 1: unknown section or key 'budget'"),
    ],
    ids=["misspelt-cap", "misspelt-table", "unknown-top-level"],
)
def test_an_unknown_key_is_an_error_naming_the_key_and_its_line(text: str, said: str) -> None:
    with pytest.raises(PolicyFileError) as error:
        parse_policy(text, path="policy.toml")

    assert said in str(error.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[defaults]\nmax_qubits = "many"\n', "defaults.max_qubits"),
        ("[defaults]\nmax_shots = 2.5\n", "defaults.max_shots"),
        ('[defaults]\nallowed_backends = "aer/*"\n', "defaults.allowed_backends"),
        ("[defaults]\nmax_depth = 0\n", "defaults.max_depth"),
        ("[defaults]\nmax_qubits = 10001\n", "defaults.max_qubits"),
    ],
    ids=["string-for-int", "fraction-for-int", "string-for-list", "zero-depth", "qubits-over-ceiling"],
)
def test_a_wrong_type_or_value_is_an_error_naming_the_key_and_its_line(text: str, key: str) -> None:
    with pytest.raises(PolicyFileError) as error:
        parse_policy(text, path="policy.toml")

    assert str(error.value).startswith(f"policy.toml: line 2: {key}: ")


def test_a_level_that_is_not_a_table_is_an_error_naming_it() -> None:
    with pytest.raises(PolicyFileError) as error:
        parse_policy("defaults = 3\n", path="policy.toml")

    assert str(error.value) == "policy.toml: line 1: defaults must be a table"


@pytest.mark.parametrize(
    "text", ["[defaults]\nmax_qubits = true\n", '[defaults]\nmax_shots = "1000"\n'], ids=["bool", "digit-string"]
)
def test_a_toml_value_of_the_wrong_type_is_refused_even_when_pydantic_could_coerce_it(text: str) -> None:
    with pytest.raises(PolicyFileError):
        parse_policy(text, path="policy.toml")


def test_a_missing_policy_file_means_the_shipped_default_policy(tmp_path: Path) -> None:
    missing = load_policy(tmp_path / "no-such-policy.toml")

    assert missing.defaults == parse_policy(default_policy_text()).defaults
    assert missing.defaults != Rules()
    assert missing.rules_for(agent="alice", project="default") == missing.defaults


def test_load_policy_reads_the_file_and_names_it_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[defaults]\nmax_shots = 123\n")
    bad = tmp_path / "bad.toml"
    bad.write_text("[defaults]\nmax_shots = [\n")

    assert load_policy(good).defaults.max_shots == 123
    with pytest.raises(PolicyFileError) as error:
        load_policy(bad)
    assert error.value.path == str(bad)


def test_an_unreadable_policy_path_is_an_error_not_the_defaults(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError, match="cannot read"):
        load_policy(tmp_path)  # a directory


# -- pricing ------------------------------------------------------------------------------------------

QPU = Price(
    "braket/iqm_garnet", "per_task_shot", True, {"per_task_usd": Decimal("0.30"), "per_shot_usd": Decimal("0.00145")}
)
FREE = Price("aer/*", "free", True)


def test_a_cost_estimate_is_exact_integer_micro_dollars() -> None:
    cost = estimate_cost(QPU, JobShape(circuits=3, shots=1000)).micro_usd

    assert cost == 3 * (300_000 + 1000 * 1_450) == 5_250_000
    assert type(cost) is int
    assert format_usd(cost) == "$5.25"


def test_many_tiny_charges_add_up_without_rounding() -> None:
    one_micro_each = Price(
        "x/*", "per_task_shot", True, {"per_task_usd": Decimal("0.000001"), "per_shot_usd": Decimal("0.000001")}
    )

    cost = estimate_cost(one_micro_each, JobShape(circuits=1_000, shots=99_999)).micro_usd

    assert cost == 100_000_000
    assert format_usd(cost) == "$100.00"


def test_simulators_are_free() -> None:
    estimate = estimate_cost(FREE, JobShape(circuits=1_000, shots=100_000))

    assert (estimate.micro_usd, estimate.qpu_seconds, estimate.pricing_known) == (0, 0.0, True)
    assert FREE.describe() == "free"


@pytest.mark.parametrize(
    ("micro_usd", "shown"),
    [(0, "$0.00"), (10_000, "$0.01"), (1_000_000, "$1.00"), (1_234_567_890, "$1,234.57")],
)
def test_format_usd_shows_dollars_and_cents_with_thousands_separators(micro_usd: int, shown: str) -> None:
    assert format_usd(micro_usd) == shown


def test_a_price_model_describes_itself_per_task_and_per_shot() -> None:
    assert QPU.describe() == "$0.30 per task + $0.00145 per shot"
