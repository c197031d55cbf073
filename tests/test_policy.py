"""Policy: the per-job caps admission checks, the policy file that sets them, and what a job costs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from qpu_gateway.policy.admission import JobFacts, check_job
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import (
    Policy,
    PolicyFileError,
    Rules,
    default_policy_text,
    load_policy,
    parse_policy,
)
from qpu_gateway.policy.pricing import FREE, PriceModel, estimate_cost_micro_usd, format_usd

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


def test_the_shipped_policy_file_says_exactly_the_built_in_defaults() -> None:
    shipped = parse_policy(default_policy_text())

    assert shipped == Policy()
    assert shipped.defaults == Rules()


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
    ("text", "key"),
    [
        ("[defaults]\nmax_qbits = 5\n", "defaults.max_qbits"),
        ("[default]\nmax_qubits = 5\n", "default"),
        ("budget = 10\n", "budget"),
    ],
    ids=["misspelt-cap", "misspelt-table", "unknown-top-level"],
)
def test_an_unknown_key_is_an_error_naming_the_key(text: str, key: str) -> None:
    with pytest.raises(PolicyFileError) as error:
        parse_policy(text, path="policy.toml")

    assert f"{key}: Extra inputs are not permitted" in str(error.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[defaults]\nmax_qubits = "many"\n', "defaults.max_qubits"),
        ("[defaults]\nmax_shots = 2.5\n", "defaults.max_shots"),
        ('[defaults]\nallowed_backends = "aer/*"\n', "defaults.allowed_backends"),
        ("[defaults]\nmax_depth = 0\n", "defaults.max_depth"),
        ("[defaults]\nmax_qubits = 10001\n", "defaults.max_qubits"),
        ("defaults = 3\n", "defaults"),
    ],
    ids=["string-for-int", "fraction-for-int", "string-for-list", "zero-depth", "qubits-over-ceiling", "scalar-table"],
)
def test_a_wrong_type_or_value_is_an_error_naming_the_key(text: str, key: str) -> None:
    with pytest.raises(PolicyFileError) as error:
        parse_policy(text, path="policy.toml")

    assert str(error.value).startswith(f"policy.toml: {key}: ")


@pytest.mark.parametrize(
    "text", ["[defaults]\nmax_qubits = true\n", '[defaults]\nmax_shots = "1000"\n'], ids=["bool", "digit-string"]
)
def test_a_toml_value_of_the_wrong_type_is_refused_even_when_pydantic_could_coerce_it(text: str) -> None:
    with pytest.raises(PolicyFileError):
        parse_policy(text, path="policy.toml")


def test_a_missing_policy_file_means_the_built_in_defaults(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "no-such-policy.toml") == Policy()


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

QPU = PriceModel(per_task_micro_usd=300_000, per_shot_micro_usd=1_450)


def test_a_cost_estimate_is_exact_integer_micro_dollars() -> None:
    cost = estimate_cost_micro_usd(QPU, shots=1000, circuits=3)

    assert cost == 3 * (300_000 + 1000 * 1_450) == 5_250_000
    assert type(cost) is int
    assert format_usd(cost) == "$5.25"


def test_many_tiny_charges_add_up_without_rounding() -> None:
    one_micro_per_shot = PriceModel(per_task_micro_usd=1, per_shot_micro_usd=1)

    cost = estimate_cost_micro_usd(one_micro_per_shot, shots=99_999, circuits=1_000)

    assert cost == 100_000_000
    assert format_usd(cost) == "$100.00"


def test_simulators_are_free() -> None:
    assert estimate_cost_micro_usd(FREE, shots=100_000, circuits=1_000) == 0
    assert FREE.describe() == "free"


@pytest.mark.parametrize(
    ("micro_usd", "shown"),
    [(0, "$0.00"), (10_000, "$0.01"), (1_000_000, "$1.00"), (1_234_567_890, "$1,234.57")],
)
def test_format_usd_shows_dollars_and_cents_with_thousands_separators(micro_usd: int, shown: str) -> None:
    assert format_usd(micro_usd) == shown


def test_a_price_model_describes_itself_per_task_and_per_shot() -> None:
    assert QPU.describe() == "$0.3000 per task + $0.001450 per shot"
