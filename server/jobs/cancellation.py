"""Cancelling a job, the one path for an agent's `cancel_job` and an operator's `jobs cancel`.

In one transaction the job becomes `cancelled`, its reservation is released and its audit row is
written; then it is stopped where it runs and cancelled at its provider. A worker of this process
holding the job does both itself (`Workers.stop_cancelled`). A job held by another process is
noticed there within a poll interval, and that worker, which has the provider's credentials,
stops it and cancels it at the provider; the canceller also cancels it at the provider when it
can, which covers a job no live worker holds. Cancelling twice at a provider is harmless.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qpu_gateway.adapters.base import Adapter, ProviderRef
from qpu_gateway.audit.operators import operator_entry
from qpu_gateway.jobs.states import JobState
from qpu_gateway.keys import Principal
from qpu_gateway.store import Store
from qpu_gateway.store.records import AuditEntry, JobRecord

if TYPE_CHECKING:
    from qpu_gateway.jobs.events import JobEvents
    from qpu_gateway.jobs.providers import Providers
    from qpu_gateway.jobs.worker import Workers

log = logging.getLogger(__name__)

OPERATOR_CANCELLED = "cancelled_by_operator"  # the job's error code, which the agent reads in get_job


@dataclass(frozen=True, slots=True)
class Canceller:
    """Who cancels a job and what the job records of it."""

    cancelled_by: str  # the job's `cancelled_by`: 'agent' or 'operator <user>'
    audit: AuditEntry
    error_code: str | None = None
    error_message: str | None = None  # what the job's agent reads

    @classmethod
    def agent(cls, who: Principal) -> Canceller:
        entry = AuditEntry(tool="job.cancelled", decision="event", key_id=who.key_id, detail="cancelled by its agent")
        return cls("agent", entry)

    @classmethod
    def operator(cls, by: str, reason: str) -> Canceller:
        """An operator's cancel: the agent is told an operator did it and why; the record names the operator."""
        return cls(
            f"operator {by}",
            operator_entry("jobs.cancel", by, detail=f"cancelled by operator {by}: {reason}"),
            error_code=OPERATOR_CANCELLED,
            error_message=f"Cancelled by an operator: {reason}",
        )


@dataclass(frozen=True, slots=True)
class Cancelled:
    job: JobRecord  # as stored once cancelled
    was: JobState  # its state before
    at_provider: str  # what happened at the provider, for the operator


async def cancel_job(
    store: Store,
    job: JobRecord,
    canceller: Canceller,
    *,
    providers: Providers,
    workers: Workers | None = None,
    events: JobEvents | None = None,
) -> Cancelled | None:
    """Cancel `job` (read just before); None if it ended meanwhile (nothing is written then)."""
    now = time.time()
    fields = {"finished_at": now, "lease_owner": None, "lease_expires": None, "cancelled_by": canceller.cancelled_by}
    if canceller.error_code is not None:
        fields.update(error_code=canceller.error_code, error_message=canceller.error_message)
    moved = await store.transition(job.id, JobState.CANCELLED, now, fields=fields, audit=canceller.audit)
    if moved is None:
        return None
    adapter = providers.adapter_for(moved.backend)
    if workers is not None and workers.holds(moved.id):
        await workers.stop_cancelled(moved)
        at_provider = "stopped by this process's worker, which cancels it at the provider"
    elif moved.provider_ref is not None and adapter is not None:
        at_provider = await cancel_at_provider(adapter, moved.id, moved.provider_ref)
    elif job.state in (JobState.QUEUED, JobState.PENDING_APPROVAL):
        at_provider = "it never reached a provider"
    else:
        at_provider = "the worker running it stops it and cancels it at the provider"
    if events is not None:
        await events.announce(moved)
    return Cancelled(moved, job.state, at_provider)


async def cancel_at_provider(adapter: Adapter, job_id: str, provider_ref: str) -> str:
    """Ask the provider to cancel the job's run; the job is cancelled here whatever it answers."""
    try:
        await adapter.cancel(ProviderRef(provider_ref))
    except Exception as exc:  # the provider may have finished it, or refuse: it is cancelled on our side
        log.warning("provider cancel of job %s failed: %s", job_id, exc, extra={"job_id": job_id})
        return f"the provider's cancel failed ({str(exc)[:200]}); it may still finish it"
    log.info("job cancelled at its provider", extra={"job_id": job_id})
    return "cancelled at the provider"
