"""The chaos scenarios at a small size, in `make test`: nothing lost, run twice, left reserved or
spent over budget, and every other invariant the scenario checks. `make chaos` runs them at full
size and prints the table (see tests/chaos/). On PostgreSQL `make test` runs `crash-postgresql` (replicas
SIGKILLed under load: leases, reclaims, nothing run twice); `budget-postgresql` runs in `make chaos` only,
since tests/test_policy_concurrency.py races a budget across processes on PostgreSQL already."""

from __future__ import annotations

from pathlib import Path

import pytest

from .chaos.scenarios import SCENARIOS, SMALL

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("name", [name for name in SCENARIOS if name != "budget-postgresql"])
async def test_chaos_scenario_holds_its_invariants(tmp_path: Path, name: str) -> None:
    row = await SCENARIOS[name](tmp_path, SMALL)
    assert row.broken == [], f"{row.scenario}: {row.broken}; figures: {row.other}"
    assert (row.lost, row.run_twice, row.left_reserved_micro, row.over_budget_micro) == (0, 0, 0, 0)
    assert row.jobs > 0
