"""Job states and the one table of transitions between them."""

from __future__ import annotations

import enum


class JobState(enum.StrEnum):
    PENDING_APPROVAL = "pending_approval"  # admitted, waiting for a person's yes (policy issue)
    QUEUED = "queued"  # durable and waiting for a worker
    SUBMITTING = "submitting"  # a worker holds the lease and is handing it to the provider
    RUNNING = "running"  # the provider accepted it; the worker polls for the result
    SUCCEEDED = "succeeded"  # counts are stored
    FAILED = "failed"  # ended without counts; error_code and error_message say why
    CANCELLED = "cancelled"  # stopped by its agent or an operator
    REJECTED = "rejected"  # admission or approval said no
    EXPIRED = "expired"  # approval never came


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.REJECTED, JobState.EXPIRED})

# Every allowed move. Back to QUEUED from SUBMITTING or RUNNING is a worker handing a job back
# (graceful shutdown, a transient failure, or a local run lost with its process). SUBMITTING
# straight to SUCCEEDED is a job whose adapter ran it inside `submit` (the local simulator):
# it was never waiting at the provider, so there is no RUNNING to record.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING_APPROVAL: frozenset({JobState.QUEUED, JobState.REJECTED, JobState.EXPIRED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.SUBMITTING, JobState.CANCELLED, JobState.FAILED}),
    JobState.SUBMITTING: frozenset(
        {JobState.RUNNING, JobState.SUCCEEDED, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}
    ),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
    JobState.REJECTED: frozenset(),
    JobState.EXPIRED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A move the table does not allow: a bug in the caller, never an agent's mistake."""


def check_transition(old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"job state {old} -> {new} is not allowed")


def sources_of(new: JobState) -> frozenset[JobState]:
    """The states a job may move to `new` from, for guarded UPDATEs."""
    return frozenset(old for old, targets in TRANSITIONS.items() if new in targets)
