"""The per-job wall-clock cap: a job at its provider past `max_wall_clock` is cancelled there and fails `timeout`.

These run on the test-only `faulty/qpu` backend with its provider books (`provider.db`): a `hang`
job is accepted and runs at the fake provider until it is cancelled, and the provider bills each
run it accepted (`price_usd`), which is what the ledger must end up committing. The same path on
the real SDKs' offline seams is in tests/test_adapter_ibm.py and tests/test_adapter_azure.py.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, in_memory

pytestmark = pytest.mark.anyio


def policy_with_cap(cap: str) -> str:
    return f"""
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = {{ max_repeats = 100000, window_minutes = 1 }}
agent_quota = {{ cost_usd = {{ day = "10.00" }} }}
max_wall_clock = {{ "faulty/*" = "{cap}" }}

[prices."faulty/*"]
model = "free"
"""


def hanging(config: Config, tmp_path: Path, price_usd: float) -> Config:
    return Config(
        **{**config.__dict__, "faults": f"mix:hang=1,price_usd={price_usd}", "faults_dir": tmp_path / "provider"}
    )


def provider_runs(tmp_path: Path) -> list[tuple[str, str | None, float | None, int]]:
    """(job id, counts or None if it never finished, when it was cancelled, what it billed) per run."""
    with closing(sqlite3.connect(tmp_path / "provider" / "provider.db")) as db:
        rows = db.execute("SELECT job_id, counts, cancelled_at, cost_micro_usd FROM runs")
        return [(r[0], r[1], r[2], int(r[3])) for r in rows]


def cost_today(usage: dict[str, Any]) -> tuple[int, int]:
    line = next(q for q in usage["quotas"] if (q["scope"], q["dimension"], q["period"]) == ("agent", "cost", "day"))
    return line["committed"], line["reserved"]


@pytest.mark.parametrize(("price_usd", "committed"), [(0.25, 250_000), (0.0, 0)])
async def test_a_job_past_its_cap_is_cancelled_at_the_provider_and_charged_what_the_provider_bills(
    config: Config, alice_key: str, tmp_path: Path, price_usd: float, committed: int
) -> None:
    config.policy_path.write_text(policy_with_cap("1s"), encoding="utf-8")
    gateway = Gateway(hanging(config, tmp_path, price_usd))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
        usage = (await client.call_tool("get_usage", {})).structured_content
        rows = await gateway.store.audit_tail(limit=50, job_id=job_id)
        trail = [(r.tool, r.error_code) for r in rows if r.tool.startswith("job.")]
        job = await gateway.store.get_job(job_id)
    view = done.structured_content
    assert view["state"] == "failed" and view["error"]["code"] == "timeout", view
    message = view["error"]["message"]
    assert "wall-clock cap of 1s" in message and "cancelled at the provider" in message
    assert f"${price_usd:.2f}" in message
    assert trail[-2:] == [("job.running", None), ("job.failed", "timeout")]
    assert gateway.providers.adapters["faulty"].cancels == 1  # type: ignore[attr-defined]
    ((run_job, counts, cancelled_at, billed),) = provider_runs(tmp_path)
    assert run_job == job_id and counts is None and cancelled_at is not None  # cancelled there, never finished
    assert cost_today(usage) == (billed, 0) == (committed, 0)  # the ledger holds what the provider billed
    assert job is not None and job.submitted_at is not None and job.finished_at is not None
    assert job.finished_at - job.submitted_at >= 1.0


async def test_a_policy_edit_shortens_the_cap_of_a_job_already_waiting(
    config: Config, alice_key: str, tmp_path: Path
) -> None:
    config.policy_path.write_text(policy_with_cap("1h"), encoding="utf-8")
    gateway = Gateway(hanging(config, tmp_path, 0.0))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        waited = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 2})
        assert waited.structured_content["state"] == "running"
        config.policy_path.write_text(policy_with_cap("2s"), encoding="utf-8")
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
    assert done.structured_content["state"] == "failed" and done.structured_content["error"]["code"] == "timeout"
    assert "wall-clock cap of 2s" in done.structured_content["error"]["message"]


async def test_the_clock_counts_from_the_provider_accepting_the_job_not_from_the_last_process_start(
    config: Config, alice_key: str, tmp_path: Path
) -> None:
    config.policy_path.write_text(policy_with_cap("1h"), encoding="utf-8")
    first = Gateway(hanging(config, tmp_path, 0.0))
    async with first.running(), in_memory(first, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        waited = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 1})
        assert waited.structured_content["state"] == "running"
    # The first process stopped and handed the job back with its provider reference; by the time
    # the second starts, the job has been at the provider longer than the new cap.
    config.policy_path.write_text(policy_with_cap("4s"), encoding="utf-8")
    await anyio.sleep(4)
    second = Gateway(hanging(config, tmp_path, 0.0))
    async with second.running(), in_memory(second, alice_key) as client:
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
        rows = [r for r in await second.store.audit_tail(limit=50, job_id=job_id) if r.tool.startswith("job.")]
        job = await second.store.get_job(job_id)
    assert done.structured_content["state"] == "failed" and done.structured_content["error"]["code"] == "timeout"
    assert [r.tool for r in rows[-3:]] == ["job.handed_back", "job.claimed", "job.failed"]
    assert second.providers.adapters["faulty"].cancels == 1  # type: ignore[attr-defined]
    # Cancelled when the second process claimed it: a clock restarted there could not have run out
    # before a whole cap (4 s) after the claim.
    assert job is not None and job.submitted_at is not None and job.submitted_at < rows[-3].at
    assert rows[-1].at - rows[-2].at < 4


async def test_an_agent_reads_its_caps_in_qpu_policy(config: Config, alice_key: str) -> None:
    config.policy_path.write_text(
        policy_with_cap("30m") + '\n[agents.alice]\nmax_wall_clock = { "ibm/*" = "2h" }\n', encoding="utf-8"
    )
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        policy = json.loads((await client.read_resource("qpu://policy")).contents[0].text)
    assert policy["max_wall_clock"] == {"*": 86400, "faulty/*": 1800, "ibm/*": 7200}
