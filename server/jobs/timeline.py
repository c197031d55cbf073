"""A job's timeline: its events in order, read from the audit log.

Every change of a job is an audit row naming it (admission, a hold, an operator's decision, each
claim, each retried provider call with its provider code and wait, running, the end with its
settled cost), so the log is the timeline; reads of the job (get_job, wait_for_job, resource
reads) are left out. It is bounded for an agent's context: the first HEAD events and the last
TAIL, with how many were left out between (`qpu-gateway jobs show` prints them all).
"""

from __future__ import annotations

from qpu_gateway.jobs import models
from qpu_gateway.jobs.states import TERMINAL
from qpu_gateway.policy.pricing import format_usd
from qpu_gateway.store import Store
from qpu_gateway.store.records import AuditRecord, JobRecord

HEAD = 30
TAIL = 10
# Rows read from each end of the job's audit rows: its reads may be many more than its events.
READ = 200
# Audit rows of a job that are not events of it: reads by its agent.
_READS = frozenset({"get_job", "wait_for_job", "list_jobs", "completion/complete", "subscriptions/listen"})
_CALLS = {"submit_job": "admitted", "cancel_job": "cancelled", "jobs.cancel": "cancelled"}


def is_event(row: AuditRecord) -> bool:
    return not (row.tool in _READS or row.tool.startswith(("resources/", "prompts/")))


def event_of(row: AuditRecord, job: JobRecord) -> models.TimelineEvent:
    """One audit row of the job as a timeline event."""
    name = _CALLS.get(row.tool) or row.tool.removeprefix("job.").removeprefix("approvals.")
    if row.tool == "submit_job":
        name = {"held": "held", "asked": "asked"}.get(row.decision, name if row.decision == "ok" else "refused")
    elif name == "approve":
        name = "approved"
    elif name == "deny":
        name = "denied"
    detail = row.detail
    if name in ("admitted", "held"):
        detail = detail or f"{job.shots} shots on {job.backend}, estimate {format_usd(job.estimate_micro_usd)}"
    if row.tool == f"job.{job.state.value}" and job.state in TERMINAL:
        detail = "; ".join(part for part in (detail, settled(job)) if part)
    by = f"operator {row.operator}" if row.operator and (not detail or row.operator not in detail) else None
    return models.TimelineEvent(
        at=models.iso(row.at) or "",
        event=name,
        code=row.error_code,
        detail="; ".join(part for part in (detail, by) if part) or None,
    )


def settled(job: JobRecord) -> str | None:
    """What the job's end did to its reservation, in words."""
    if job.ledger_status == "committed":
        return f"charged {format_usd(job.ledger_micro_usd or 0)} (estimate {format_usd(job.estimate_micro_usd)})"
    if job.ledger_status == "released":
        return f"nothing charged: the reservation of {format_usd(job.estimate_micro_usd)} was released"
    return None


async def job_timeline(store: Store, job: JobRecord, *, whole: bool = False) -> models.Timeline:
    """The job's events oldest first: all of them with `whole`, else at most HEAD + TAIL."""
    if whole:
        rows = await store.audit_tail(limit=100_000, job_id=job.id)
    else:
        first = await store.audit_since(after_seq=0, limit=READ, job_id=job.id)
        last = await store.audit_tail(limit=READ, job_id=job.id)
        rows = sorted({row.seq: row for row in first + last}.values(), key=lambda row: row.seq)
    events = [event_of(row, job) for row in rows if is_event(row)]
    if whole or len(events) <= HEAD + TAIL:
        return models.Timeline(events=events)
    return models.Timeline(events=events[:HEAD] + events[-TAIL:], omitted=len(events) - HEAD - TAIL)
