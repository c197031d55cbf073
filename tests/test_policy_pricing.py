"""Prices and estimates: which entry prices a backend, and what a job costs in whole micro-dollars, rounded up."""

from __future__ import annotations

from decimal import Decimal

import pytest

from qpu_gateway.policy.pricing import (
    MODELS,
    JobShape,
    Price,
    PriceError,
    estimate_cost,
    format_usd,
    parse_price,
    parse_price_table,
    price_for,
    shipped_prices,
    to_micro_usd,
)

SHIPPED = shipped_prices()


def price(model: str, **figures: str) -> Price:
    return Price("lab/*", model, True, {name: Decimal(value) for name, value in figures.items()})


# -- which entry prices a backend ---------------------------------------------------------------------


def test_an_exact_backend_id_wins_over_a_pattern_that_also_matches_it() -> None:
    table = parse_price_table(
        {"ibm/*": {"model": "per_qpu_second", "per_second_usd": "1.60"}, "ibm/ibm_torino": {"model": "free"}}
    )

    chosen = price_for(table, "ibm/ibm_torino")

    assert chosen is not None and chosen.pattern == "ibm/ibm_torino"


@pytest.mark.parametrize(
    "order", [("ibm/*", "ibm/fake_*"), ("ibm/fake_*", "ibm/*")], ids=["wide-first", "narrow-first"]
)
def test_the_longest_matching_pattern_wins_whatever_the_table_order(order: tuple[str, str]) -> None:
    entries = {"ibm/*": {"model": "per_qpu_second", "per_second_usd": "1.60"}, "ibm/fake_*": {"model": "free"}}
    table = parse_price_table({pattern: entries[pattern] for pattern in order})

    fake, real = price_for(table, "ibm/fake_sherbrooke"), price_for(table, "ibm/ibm_kyiv")

    assert fake is not None and fake.pattern == "ibm/fake_*"
    assert real is not None and real.pattern == "ibm/*"


@pytest.mark.parametrize(
    ("backend", "pattern"),
    [
        ("aer/simulator", "aer/*"),
        ("ibm/fake_sherbrooke", "ibm/fake_*"),
        ("ibm/ibm_torino", "ibm/*"),
        ("braket/iqm_garnet", "braket/iqm_garnet"),
        ("azure/ionq.qpu.forte-1", "azure/ionq.qpu.forte-1"),
    ],
)
def test_the_shipped_table_prices_each_kind_of_backend_from_its_most_specific_entry(backend: str, pattern: str) -> None:
    chosen = price_for(SHIPPED, backend)

    assert chosen is not None and chosen.pattern == pattern


@pytest.mark.parametrize("backend", ["braket/some_new_qpu", "IBM/ibm_torino", "local/x", ""])
def test_a_backend_no_entry_matches_has_no_price(backend: str) -> None:
    assert price_for(SHIPPED, backend) is None


# -- estimates, per model -----------------------------------------------------------------------------


def test_per_task_and_per_shot_on_the_shipped_iqm_garnet_is_exact() -> None:
    estimate = estimate_cost(price_for(SHIPPED, "braket/iqm_garnet"), JobShape(circuits=1, shots=1_000))

    # $0.30 per task + 1000 x $0.00145 per shot = $1.75, exactly.
    assert estimate.micro_usd == 300_000 + 1_000 * 1_450 == 1_750_000
    assert type(estimate.micro_usd) is int
    assert estimate.pricing_known is True
    assert format_usd(estimate.micro_usd) == "$1.75"


def test_per_task_is_charged_once_per_circuit_of_a_sweep() -> None:
    estimate = estimate_cost(SHIPPED["braket/rigetti_ankaa_3"], JobShape(circuits=4, shots=250))

    assert estimate.micro_usd == 4 * (300_000 + 250 * 900) == 2_100_000


def test_ionq_gate_shots_follow_azures_formula_per_program() -> None:
    # m + p1 * N1q * C + p2 * N2q * C, with m = $12.4166, p1 = $0.000220, p2 = $0.000975, C = shots.
    shape = JobShape(circuits=1, shots=100, one_qubit_gates=10, two_qubit_gates=4)

    estimate = estimate_cost(price_for(SHIPPED, "azure/ionq.qpu.forte-1"), shape)

    assert estimate.micro_usd == 12_416_600 + 220 * 10 * 100 + 975 * 4 * 100 == 13_026_600


def test_ionq_charges_its_per_program_minimum_for_each_circuit_and_gates_over_all_circuits() -> None:
    # Two programs of 100 shots; the gate counts are totals over both circuits.
    shape = JobShape(circuits=2, shots=100, one_qubit_gates=4, two_qubit_gates=2)

    estimate = estimate_cost(SHIPPED["azure/ionq.qpu.aria-1"], shape)

    assert estimate.micro_usd == 2 * 12_416_600 + 220 * 4 * 100 + 975 * 2 * 100 == 25_116_200


def test_per_qpu_second_charges_the_estimated_qpu_time() -> None:
    # The estimate assumes 2 s per circuit plus 1 ms per shot: 2 x (2 + 1.5) = 7 s at $1.60.
    estimate = estimate_cost(price_for(SHIPPED, "ibm/ibm_torino"), JobShape(circuits=2, shots=1_500))

    assert estimate.qpu_seconds == 7.0
    assert estimate.micro_usd == 7 * 1_600_000


def test_per_minute_charges_at_least_its_minimum_seconds() -> None:
    short = estimate_cost(SHIPPED["braket/sv1"], JobShape(circuits=1, shots=10))  # 2.01 s, billed as 3 s
    longer = estimate_cost(SHIPPED["braket/sv1"], JobShape(circuits=3, shots=1_000))  # 9 s

    assert short.micro_usd == 3_750  # 3 s x $0.075 / 60
    assert longer.micro_usd == 11_250


def test_quantinuum_hqcs_are_priced_once_an_operator_sets_the_rate() -> None:
    table = parse_price_table(
        {
            "azure/quantinuum.qpu.h2-1": {
                "model": "quantinuum_hqc",
                "per_hqc_usd": "10",
                "hqc_base": 5,
                "weight_2q": 10,
                "weight_measure": 5,
                "hqc_divisor": 5000,
            }
        }
    )
    shape = JobShape(circuits=1, shots=100, one_qubit_gates=10, two_qubit_gates=5, measurements=2)

    estimate = estimate_cost(table["azure/quantinuum.qpu.h2-1"], shape)

    # HQC = 5 + 100 x (10 + 10 x 5 + 5 x 2) / 5000 = 6.4, at $10 each.
    assert estimate.micro_usd == 64_000_000


def test_a_free_backend_costs_nothing_and_uses_no_qpu_time() -> None:
    estimate = estimate_cost(price_for(SHIPPED, "ibm/fake_sherbrooke"), JobShape(circuits=1_000, shots=100_000))

    assert (estimate.micro_usd, estimate.qpu_seconds, estimate.pricing_known) == (0, 0.0, True)


@pytest.mark.parametrize("backend", ["braket/iqm_emerald", "azure/quantinuum.qpu.h2-1", "braket/unlisted"])
def test_an_unknown_price_is_explicit_and_still_estimates_qpu_time(backend: str) -> None:
    estimate = estimate_cost(price_for(SHIPPED, backend), JobShape(circuits=1, shots=1_000))

    assert estimate.micro_usd is None
    assert estimate.pricing_known is False
    assert estimate.qpu_seconds == 3.0


def test_an_entry_missing_a_figure_its_model_needs_is_not_known() -> None:
    half = parse_price("lab/*", {"model": "per_task_shot", "per_task_usd": "0.30"})

    assert half.known is False
    assert estimate_cost(half, JobShape(circuits=1, shots=1)).micro_usd is None
    assert "price not known" in half.describe()


# -- rounding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shots", "micro_usd"),
    [(1, 1), (9, 1), (10, 1), (11, 2), (19, 2), (20, 2), (21, 3)],
)
def test_a_fraction_of_a_micro_dollar_is_rounded_up_never_down(shots: int, micro_usd: int) -> None:
    tenth_of_a_micro_per_shot = price("per_task_shot", per_task_usd="0", per_shot_usd="0.0000001")

    assert estimate_cost(tenth_of_a_micro_per_shot, JobShape(circuits=1, shots=shots)).micro_usd == micro_usd


def test_rounding_up_applies_to_time_based_prices_too() -> None:
    # One circuit, one shot: 2.001 s at $0.0000003/s = 0.6003 micro-dollars, reserved as 1.
    tiny_rate = price("per_qpu_second", per_second_usd="0.0000003")

    assert estimate_cost(tiny_rate, JobShape(circuits=1, shots=1)).micro_usd == 1


# -- the shipped table --------------------------------------------------------------------------------


def test_the_shipped_table_parses_into_known_models() -> None:
    assert len(SHIPPED) >= 10
    assert {entry.model for entry in SHIPPED.values()} <= set(MODELS)
    assert {"aer/*", "ibm/*", "ibm/fake_*", "braket/iqm_garnet", "azure/ionq.qpu.aria-1"} <= set(SHIPPED)


@pytest.mark.parametrize("pattern", sorted(p for p, entry in SHIPPED.items() if entry.known))
def test_every_known_shipped_price_estimates_whole_micro_dollars(pattern: str) -> None:
    entry = SHIPPED[pattern]
    shape = JobShape(circuits=3, shots=1_000, one_qubit_gates=10, two_qubit_gates=5, measurements=4)

    estimate = estimate_cost(entry, shape)

    assert estimate.pricing_known is True
    assert type(estimate.micro_usd) is int and estimate.micro_usd >= 0
    assert (estimate.micro_usd == 0) == (entry.model == "free")
    if entry.model != "free":
        assert entry.source, f"{pattern} has no source"


def test_the_shipped_table_admits_what_it_cannot_price() -> None:
    unknown = sorted(pattern for pattern, entry in SHIPPED.items() if not entry.known)

    assert "braket/iqm_emerald" in unknown and "azure/quantinuum.qpu.h2-1" in unknown
    for pattern in unknown:
        assert estimate_cost(SHIPPED[pattern], JobShape(circuits=1, shots=1)).micro_usd is None


# -- amounts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "micro_usd"), [("1.75", 1_750_000), ("0.000001", 1), (0.1, 100_000), (12, 12_000_000), ("0", 0)]
)
def test_to_micro_usd_converts_exactly(value: str | float, micro_usd: int) -> None:
    assert to_micro_usd(value) == micro_usd


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("0.0000001", "finer than a micro-dollar"),
        ("1.0000005", "finer than a micro-dollar"),
        ("-1", "non-negative"),
        ("Infinity", "non-negative"),
        ("ten", "not an amount in USD"),
        (True, "not an amount in USD"),
    ],
)
def test_to_micro_usd_refuses_what_is_not_a_whole_micro_dollar_amount(value: str | bool, said: str) -> None:
    with pytest.raises(PriceError, match=said):
        to_micro_usd(value, "max_cost_usd")


def test_to_micro_usd_refuses_not_a_number() -> None:
    with pytest.raises(PriceError):
        to_micro_usd("NaN", "max_cost_usd")


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ({"model": "per_gate"}, "model must be one of"),
        ({}, "model must be one of"),
        ({"model": "per_task_shot", "per_task_usd": "-0.30", "per_shot_usd": "0.01"}, "non-negative"),
        ({"model": "per_qpu_second", "per_second_usd": "cheap"}, "not an amount in USD"),
    ],
    ids=["unknown-model", "no-model", "negative", "not-money"],
)
def test_a_price_entry_that_cannot_be_used_is_refused_with_its_pattern(entry: dict[str, str], said: str) -> None:
    with pytest.raises(PriceError, match=said) as error:
        parse_price("lab/qpu", entry)

    assert "price 'lab/qpu'" in str(error.value)


def test_reported_qpu_time_is_charged_at_the_list_price_per_second() -> None:
    from qpu_gateway.policy.pricing import cost_of_usage, price_for, shipped_prices

    table = shipped_prices()
    assert cost_of_usage(price_for(table, "ibm/ibm_brisbane"), 2.5) == 4_000_000  # 2.5 s x $1.60
    assert cost_of_usage(price_for(table, "braket/iqm_garnet"), 2.5) is None  # priced per task and shot
    assert cost_of_usage(price_for(table, "braket/dm1"), 2.5) is None  # price not known
