"""The chaos scenarios at a small size, in `make test`: nothing lost, run twice, left reserved or
spent over budget, and every other invariant the scenario checks. `make chaos` runs them at full
size and prints the table (see tests/chaos/). `crash-postgresql` and `budget-postgresql` run those two
on a PostgreSQL database of their own."""

from __future__ import annotations

from pathlib import Path

import pytest

from .chaos.scenarios import SCENARIOS, SMALL

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_chaos_scenario_holds_its_invariants(tmp_path: Path, name: str) -> None:
    row = await SCENARIOS[name](tmp_path, SMALL)
    assert row.broken == [], f"{row.scenario}: {row.broken}; figures: {row.other}"
    assert (row.lost, row.run_twice, row.left_reserved_micro, row.over_budget_micro) == (0, 0, 0, 0)
    assert row.jobs > 0
