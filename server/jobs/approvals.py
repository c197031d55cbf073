"""Operator decisions on held jobs: approve (queue it) or deny (reject it, releasing its reservation).

Each decision and its audit row, naming the operator, are one transaction.
"""

from __future__ import annotations

import time

from qpu_gateway.audit.operators import operator_entry
from qpu_gateway.jobs.states import JobState
from qpu_gateway.store import Store
from qpu_gateway.store.records import JobRecord


class ApprovalError(Exception):
    """The job is not waiting for approval (unknown, or already decided)."""


async def approve(store: Store, job_id: str, *, by: str) -> JobRecord:
    job = await store.transition(
        job_id,
        JobState.QUEUED,
        time.time(),
        fields={"approved_by": f"operator {by}", "queued_at": time.time()},
        audit=operator_entry("approvals.approve", by, detail=f"approved by operator {by}"),
        from_state=JobState.PENDING_APPROVAL,
    )
    if job is None:
        raise ApprovalError(f"Job {job_id!r} is not waiting for approval (see `qpu-gateway approvals list`).")
    return job


async def deny(store: Store, job_id: str, *, by: str, reason: str | None) -> JobRecord:
    why = f"denied by operator {by}" + (f": {reason}" if reason else "")
    job = await store.transition(
        job_id,
        JobState.REJECTED,
        time.time(),
        fields={"error_code": "approval_denied", "error_message": why, "finished_at": time.time()},
        audit=operator_entry("approvals.deny", by, decision="refused", error_code="approval_denied", detail=why),
        from_state=JobState.PENDING_APPROVAL,
    )
    if job is None:
        raise ApprovalError(f"Job {job_id!r} is not waiting for approval (see `qpu-gateway approvals list`).")
    return job
