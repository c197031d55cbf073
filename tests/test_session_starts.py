"""Claude Code sessions coming and going: each new stdio server finds a job to reclaim and a submit at once.

Seen in a real run: a handed-back Bell job, picked up by the next stdio process while the agent's
first submit arrived, failed permanently (`cannot import name 'DAGCircuit' from partially
initialized module`), the submit was refused `unsupported_backend`, and the failed listing kept
`aer/simulator` unavailable for a minute. Here that pattern runs 25 times against real
`qpu-gateway serve --transport stdio` processes on one SQLite file: every reclaimed job and every
submit must succeed, with no internal failure recorded on the way. Before the fix 14 starts of 20
failed, so 25 starts all passing by luck is a chance of about 0.3^25; QPU_GATEWAY_TEST_SESSION_STARTS
runs a longer soak (50 took 156 s of the suite's 730 s on one of its three workers).
"""

from __future__ import annotations

import os
import time

import pytest
from mcp import Client

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import JobState

from .support import BELL2, ERAS, in_memory, stdio_params

pytestmark = pytest.mark.anyio

STARTS = int(os.environ.get("QPU_GATEWAY_TEST_SESSION_STARTS", "25"))
GONE = "gone-host:1:dead00"  # the owner of the leases left behind: a process that no longer runs


async def leave_a_reclaimable_job(gateway: Gateway, key: str, how: str) -> str:
    """Admit a Bell job through a real session, then leave it as a session that ended would."""
    async with in_memory(gateway, key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100})
    job_id = str(submitted.structured_content["job_id"])
    store = gateway.store
    (claimed,) = await store.claim_many(["aer"], [], GONE, 0.001, time.time(), limit=1)
    assert claimed.id == job_id
    if how == "handed back":  # a session that stopped cleanly: queued again
        assert await store.hand_back(GONE, time.time()) == 1
    elif how == "ran, then died":  # its Aer run was lost with the process: known to nobody now
        moved = await store.transition(
            job_id, JobState.RUNNING, time.time(), owner=GONE, fields={"provider_ref": job_id}
        )
        assert moved is not None
    # "lease expired": killed while submitting; its lease lapses at once
    return job_id


@pytest.mark.slow
async def test_many_session_starts_each_reclaim_a_job_while_a_submit_arrives_with_no_failure(
    config: Config, alice_key: str
) -> None:
    ways = ["handed back", "lease expired", "ran, then died"]
    outcomes: list[tuple[str, str, str, str]] = []
    admin = Gateway(config)  # this process only admits and reads: no workers of its own
    async with admin.running(workers=False):
        for start in range(STARTS):
            how = ways[start % len(ways)]
            left = await leave_a_reclaimable_job(admin, alice_key, how)
            era = ERAS[start % len(ERAS)]
            async with Client(stdio_params(config, alice_key), mode=era) as client:  # type: ignore[arg-type]
                submitted = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100})  # at once
                assert not submitted.is_error, (start, how, submitted.structured_content)
                new = submitted.structured_content["job_id"]
                for job_id in (left, new):
                    done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
                    outcomes.append((how, era, job_id, done.structured_content["state"]))
        trail = await admin.store.audit_tail(limit=100_000)
    failed = [o for o in outcomes if o[3] != "succeeded"]
    assert failed == [] and len(outcomes) == 2 * STARTS
    assert [r for r in trail if r.error_code is not None] == []  # no internal failure, no refusal
