"""The adapter contract and the job and result types every adapter shares.

An adapter turns a `JobSpec` into a provider job and back: `backends`, `submit`, `status`,
`result`, `cancel`, and `usage` (what a job that ended without a result used). It classifies
every provider failure as
`TransientError` (safe to retry with backoff), `QuotaError` (the provider's own quota: surface,
never retry) or `PermanentError` (the job can never succeed as sent).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

# Per circuit: classical register name -> {bitstring: count}.
RegisterCounts = dict[str, dict[str, int]]

# How soon a provider that could not list (some of) its backends is asked again: long enough that
# every call does not hammer a provider that is down, short enough that a blip passes unnoticed.
LIST_RETRY_S = 5.0

# Failures of this process, never of a job or of its provider (an SDK that would not import, or
# only half): adapters let them through unclassified, and the worker runs the job again later.
INTERNAL_ERRORS: tuple[type[BaseException], ...] = (ImportError,)


def pass_internal(exc: BaseException) -> None:
    """Raise `exc` again if it is a failure of this process: no classification may charge it to the job."""
    if isinstance(exc, INTERNAL_ERRORS):
        raise exc


@dataclass(frozen=True, slots=True)
class Backend:
    """One device or simulator a provider offers."""

    id: str  # "provider/name", the id agents use
    provider: str
    name: str
    qubits: int | None
    simulator: bool
    status: str  # "online", "offline", "unavailable"
    max_shots: int | None = None
    basis_gates: tuple[str, ...] = ()
    queue_depth: int | None = None
    reason: str | None = None  # why a backend is unavailable, in words an operator can act on
    # Set on an unavailable entry when asking again may find it (the provider could not be reached
    # just now), not when it never will (no credentials, retired): the listing is then not cached.
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What an adapter runs: OpenQASM sources, shots per circuit, and our job id for deduplication."""

    job_id: str
    backend: str  # the backend id, "provider/name"
    circuits: tuple[str, ...]
    shots: int


@dataclass(frozen=True, slots=True)
class ProviderRef:
    """The provider's handle on a submitted job, stored so a restarted worker can poll it."""

    provider_job_id: str


class ProviderState(enum.StrEnum):
    """Where the provider says a job is."""

    QUEUED = "queued"  # accepted, waiting for the device
    RUNNING = "running"  # executing
    DONE = "done"  # finished; `result` will return the counts
    FAILED = "failed"  # finished without a result
    CANCELLED = "cancelled"  # cancelled at the provider
    UNKNOWN = "unknown"  # the provider has no such job (e.g. a local run lost with its process)


@dataclass(frozen=True, slots=True)
class ProviderStatus:
    state: ProviderState
    message: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """Counts per circuit, in the order the circuits were submitted, and what the run used."""

    counts: tuple[RegisterCounts, ...]
    qpu_seconds: float | None = None
    cost_micro_usd: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """What the provider says a job used that ended without a result (cancelled at the wall-clock cap).

    Each adapter fills what its provider reports; None where it reports nothing of that kind.
    """

    cost_micro_usd: int | None = None  # a figure in USD the provider gives (Azure's cost estimate)
    qpu_seconds: float | None = None  # QPU time the provider charges (IBM's usage)
    circuits_run: int | None = None  # circuits whose task completed, so were billed (Braket: a task each)


class AdapterError(Exception):
    """A provider failure, already classified; the message is safe to show an agent.

    `code` is the provider's own word for it where it gives one (an HTTP status as `http_503`, an
    AWS error code such as `ThrottlingException`, an SDK exception's class name): it goes into the
    job's timeline, its trace and a metric label, so it is cut to a short token of safe characters.
    """

    kind = "error"  # its class as a word: the metric label and the trace's error.type

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = provider_code(code)


def provider_code(raw: object) -> str | None:
    """`raw` as a provider code: letters, digits and `_.:-` only, at most 64 characters; None if empty."""
    if raw is None:
        return None
    text = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_.:-") else "_" for ch in str(raw).strip())[:64]
    return text.strip("_") or None


class TransientError(AdapterError):
    """Throttling, timeouts, 5xx, device offline: retry with backoff and jitter."""

    kind = "transient"


class QuotaError(AdapterError):
    """The provider's own quota is exhausted: surface as `quota_exhausted`, do not retry."""

    kind = "quota"


class PermanentError(AdapterError):
    """Invalid circuit, unsupported gate, auth failure: fail the job with this reason."""

    kind = "permanent"


class Adapter(Protocol):
    """One provider. Blocking SDK calls run in a worker thread, never on the event loop.

    An adapter that runs several jobs in one provider call (Aer's micro-batches) may also set
    `jobs_at_once`: workers then keep that many times more of its jobs in flight. One whose
    `submit` returns only once the job has run (a local simulator) may set `runs_in_submit`:
    workers then take the result at once and store it in one write, with no `running` between.
    """

    provider: str

    async def backends(self) -> list[Backend]: ...

    async def submit(self, job: JobSpec) -> ProviderRef: ...

    async def status(self, ref: ProviderRef) -> ProviderStatus: ...

    async def result(self, ref: ProviderRef) -> Result: ...

    async def cancel(self, ref: ProviderRef) -> None: ...

    async def usage(self, ref: ProviderRef) -> Usage:
        """What the job used, asked after it was cancelled (a cancelled job may have run in part)."""
        ...
