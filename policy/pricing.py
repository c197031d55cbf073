"""Prices and cost estimates, in integer micro-dollars.

Money is never a float here: 1 USD = 1_000_000 micro-dollars. Figures are read as decimal
strings and computed with `Decimal`, and an estimate is rounded UP to a whole micro-dollar, so
an admission check never under-reserves. The shipped table is `prices.toml` beside this module
(every figure with its public source and date); the policy file's `[prices]` entries replace
or add to it.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any

MICRO_USD_PER_USD = 1_000_000
_MICRO = Decimal(MICRO_USD_PER_USD)

MODELS = ("free", "per_task_shot", "per_qpu_second", "per_minute", "ionq_gate_shot", "quantinuum_hqc")

# A QPU-seconds estimate when the provider gives no formula: an assumed per-circuit overhead plus
# an assumed time per shot (not a published figure; deliberately pessimistic so the reservation
# covers the job, and committed to the provider's reported figure when the job ends).
ASSUMED_OVERHEAD_S = Decimal("2.0")
ASSUMED_SHOT_S = Decimal("0.001")


class PriceError(ValueError):
    """A price entry that cannot be used, with the reason."""


@dataclass(frozen=True, slots=True)
class Price:
    """One backend's price model; the figures it needs are in `figures` (USD, exact decimals)."""

    pattern: str
    model: str
    known: bool
    figures: dict[str, Decimal] = field(default_factory=dict)
    source: str | None = None

    def describe(self) -> str:
        f = self.figures
        if not self.known:
            return f"{self.model} (price not known: an operator must set it)"
        match self.model:
            case "free":
                return "free"
            case "per_task_shot":
                return f"${f['per_task_usd']} per task + ${f['per_shot_usd']} per shot"
            case "per_qpu_second":
                return f"${f['per_second_usd']} per QPU-second"
            case "per_minute":
                return f"${f['per_minute_usd']} per minute (minimum {f.get('min_seconds', 0)} s)"
            case "ionq_gate_shot":
                return (
                    f"${f['min_job_usd']} per job + ${f['per_1q_gate_shot_usd']} per 1-qubit gate-shot + "
                    f"${f['per_2q_gate_shot_usd']} per 2-qubit gate-shot"
                )
            case _:
                return f"${f.get('per_hqc_usd', '?')} per HQC"


@dataclass(frozen=True, slots=True)
class JobShape:
    """What a price depends on, per job: circuits, shots per circuit, and gate counts over all circuits."""

    circuits: int
    shots: int
    one_qubit_gates: int = 0
    two_qubit_gates: int = 0
    measurements: int = 0


@dataclass(frozen=True, slots=True)
class CostEstimate:
    micro_usd: int | None  # None when the price is not known
    qpu_seconds: float
    pricing_known: bool


# No price, threshold or cap is anywhere near a trillion dollars; refusing larger amounts keeps
# huge exponents ("1e999999") from costing seconds of integer arithmetic.
MAX_USD = Decimal(10) ** 12


def _money(value: Any, where: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except (InvalidOperation, ArithmeticError):
        raise PriceError(f"{where}: {value!r} is not an amount in USD") from None
    if not amount.is_finite() or amount < 0:
        raise PriceError(f"{where}: {value!r} must be a non-negative amount")
    if amount > MAX_USD:
        raise PriceError(f"{where}: {value!r} is more than $1,000,000,000,000")
    return amount


_NEEDS = {
    "free": (),
    "per_task_shot": ("per_task_usd", "per_shot_usd"),
    "per_qpu_second": ("per_second_usd",),
    "per_minute": ("per_minute_usd",),
    "ionq_gate_shot": ("per_1q_gate_shot_usd", "per_2q_gate_shot_usd", "min_job_usd"),
    "quantinuum_hqc": ("per_hqc_usd",),
}
_NUMBERS = {
    "per_task_usd",
    "per_shot_usd",
    "per_second_usd",
    "min_seconds",
    "per_minute_usd",
    "per_1q_gate_shot_usd",
    "per_2q_gate_shot_usd",
    "min_job_usd",
    "min_job_usd_error_mitigation",
    "per_hqc_usd",
    "hqc_base",
    "weight_1q",
    "weight_2q",
    "weight_measure",
    "hqc_divisor",
    "billing_increment_seconds",
}


def parse_price(pattern: str, entry: dict[str, Any]) -> Price:
    """One table entry to a `Price`; raises `PriceError` naming the entry and the problem."""
    where = f"price {pattern!r}"
    model = entry.get("model")
    if model not in MODELS:
        raise PriceError(f"{where}: model must be one of {', '.join(MODELS)}")
    figures = {k: _money(v, f"{where}.{k}") for k, v in entry.items() if k in _NUMBERS}
    missing = [k for k in _NEEDS[model] if k not in figures]
    known = bool(entry.get("known", True)) and not missing
    source = entry.get("source")
    return Price(pattern, model, known, figures, str(source) if source else None)


def parse_price_table(table: dict[str, Any]) -> dict[str, Price]:
    prices = {}
    for pattern, entry in table.items():
        if not isinstance(entry, dict):
            raise PriceError(f'price {pattern!r} must be a table with a model, e.g. [prices."{pattern}"]')
        prices[pattern] = parse_price(pattern, entry)
    return prices


def shipped_prices() -> dict[str, Price]:
    """The price table shipped with the gateway (`policy/prices.toml`)."""
    text = resources.files("qpu_gateway.policy").joinpath("prices.toml").read_text(encoding="utf-8")
    return parse_price_table(tomllib.loads(text))


def price_for(table: dict[str, Price], backend: str) -> Price | None:
    """The most specific entry for `backend`: an exact id, else the longest matching pattern."""
    if backend in table:
        return table[backend]
    matches = [p for p in table if fnmatchcase(backend, p)]
    return table[max(matches, key=lambda p: (len(p.rstrip("*")), len(p)))] if matches else None


def estimate_qpu_seconds(shape: JobShape) -> float:
    return float(shape.circuits * (ASSUMED_OVERHEAD_S + shape.shots * ASSUMED_SHOT_S))


def estimate_cost(price: Price | None, shape: JobShape) -> CostEstimate:
    """The job's cost, rounded up to a whole micro-dollar; unknown when the price is not known."""
    qpu_seconds = 0.0 if price is not None and price.model == "free" else estimate_qpu_seconds(shape)
    if price is None or not price.known:
        return CostEstimate(None, qpu_seconds, False)
    f, c, shots = price.figures, Decimal(shape.circuits), Decimal(shape.shots)
    match price.model:
        case "free":
            usd = Decimal(0)
        case "per_task_shot":
            usd = c * (f["per_task_usd"] + shots * f["per_shot_usd"])
        case "per_qpu_second":
            usd = Decimal(str(qpu_seconds)) * f["per_second_usd"]
        case "per_minute":
            seconds = max(Decimal(str(qpu_seconds)), f.get("min_seconds", Decimal(0)))
            usd = seconds / 60 * f["per_minute_usd"]
        case "ionq_gate_shot":
            # Azure's formula per program: m + p1 * N1q * C + p2 * N2q * C (C = shots).
            usd = c * f["min_job_usd"] + shots * (
                shape.one_qubit_gates * f["per_1q_gate_shot_usd"] + shape.two_qubit_gates * f["per_2q_gate_shot_usd"]
            )
        case _:  # quantinuum_hqc: HQC = base + C * (N1q + w2 * N2q + wm * Nm) / divisor, per circuit
            weighted = (
                f.get("weight_1q", Decimal(1)) * shape.one_qubit_gates
                + f.get("weight_2q", Decimal(10)) * shape.two_qubit_gates
                + f.get("weight_measure", Decimal(5)) * shape.measurements
            )
            hqc = c * f.get("hqc_base", Decimal(5)) + shots * weighted / f.get("hqc_divisor", Decimal(5000))
            usd = hqc * f["per_hqc_usd"]
    return CostEstimate(math.ceil(usd * _MICRO), qpu_seconds, True)


def cost_of_usage(price: Price | None, qpu_seconds: float) -> int | None:
    """What reported QPU time costs on a time-priced backend (None where price is not by time)."""
    if price is None or not price.known:
        return None
    seconds = Decimal(str(qpu_seconds))
    if price.model == "per_qpu_second":
        return math.ceil(seconds * price.figures["per_second_usd"] * _MICRO)
    if price.model == "per_minute":
        billed = max(seconds, price.figures.get("min_seconds", Decimal(0)))
        return math.ceil(billed / 60 * price.figures["per_minute_usd"] * _MICRO)
    return None


def to_micro_usd(value: Any, where: str = "amount") -> int:
    """A USD amount (string or number) as integer micro-dollars; refuses sub-micro precision."""
    micro = _money(value, where) * _MICRO
    if micro != micro.to_integral_value():
        raise PriceError(f"{where}: {value!r} is finer than a micro-dollar")
    return int(micro)


def format_usd(micro_usd: int) -> str:
    """Render micro-dollars as a dollar string for people (never used for arithmetic)."""
    return f"${micro_usd / MICRO_USD_PER_USD:,.2f}"
