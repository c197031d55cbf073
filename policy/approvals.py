"""Approvals: does a job need a person's yes, an operator's, or neither?"""

from __future__ import annotations

from typing import Literal

from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import Rules

Level = Literal["person", "operator"]


def approval_needed(rules: Rules, cost_micro_usd: int | None) -> Level | Refusal | None:
    """None: admit as it is. 'person': the agent's human may confirm. 'operator': only an operator.

    A job whose price is unknown (`cost_micro_usd` None) needs an operator, or is refused when the
    policy's `unknown_price` says so.
    """
    if cost_micro_usd is None:
        if rules.unknown_price == "refuse":
            return Refusal(
                "forbidden",
                "The price of this backend is not known, and the policy refuses jobs it cannot price. "
                "Ask the operator to add a price for it, or use another backend.",
                rule="unknown_price",
            )
        return "operator"
    operator = rules.micro("operator_above_usd")
    if operator is not None and cost_micro_usd > operator:
        return "operator"
    confirm = rules.micro("confirm_above_usd")
    if confirm is not None and cost_micro_usd > confirm:
        return "person"
    return None
