"""The whole path of one job through a real MCP client session, on both protocol eras and both databases.

On PostgreSQL the representative subset: OpenQASM 2 on both eras (the circuit's dialect does not
reach the store).
"""

from __future__ import annotations

import pytest

from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, BELL3, ERAS, in_memory

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize(
    ("source", "db_backend"),
    [(BELL2, "sqlite"), (BELL3, "sqlite"), (BELL2, "postgresql")],
    ids=["qasm2", "qasm3", "qasm2-postgresql"],
)
async def test_bell_circuit_is_estimated_submitted_run_and_counted(
    gateway: Gateway, alice_key: str, mode: str, source: str
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as client:
        backends = await client.call_tool("list_backends", {})
        assert not backends.is_error
        ids = [b["id"] for b in backends.structured_content["backends"]]
        assert "aer/simulator" in ids

        estimate = await client.call_tool("estimate_job", {"circuit": source, "shots": 500})
        est = estimate.structured_content
        assert (est["qubits"], est["depth"], est["two_qubit_gates"], est["cost_micro_usd"]) == (2, 3, 1, 0)
        assert est["admitted"] is True and est["total_shots"] == 500

        submitted = await client.call_tool("submit_job", {"circuit": source, "shots": 500, "name": "bell"})
        assert not submitted.is_error, submitted.content
        job_id = submitted.structured_content["job_id"]
        assert submitted.structured_content["uri"] == f"qpu://jobs/{job_id}"

        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
        view = done.structured_content
        assert view["state"] == "succeeded" and view["terminal"] is True
        counts = view["result"]["counts"][0]["c"]
        assert set(counts) <= {"00", "11"} and sum(counts.values()) == 500
        assert view["attempts"] == 1
        # Aer ran it inside submit, so one write settled it: claimed, then succeeded, nothing between.
        audit = await gateway.store.audit_tail(limit=100, job_id=job_id)
        assert [r.tool for r in audit if r.tool.startswith("job.")] == ["job.claimed", "job.succeeded"]
        assert view["started_at"] is not None and view["finished_at"] is not None
