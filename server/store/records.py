"""The rows the store keeps, as typed records shared by the service, the worker and the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

from qpu_gateway.jobs.states import JobState
from qpu_gateway.policy.quotas import Amounts, Usage


@dataclass(frozen=True, slots=True)
class Pause:
    """An operator's pause of an agent (its kill switch) or a backend (a drain)."""

    kind: str  # agent | backend
    name: str  # the agent's name or the backend id
    reason: str | None
    paused_by: str  # the operator (OS user)
    paused_at: float


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    secret_hash: str
    agent: str
    project: str
    scopes: frozenset[str]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    last_used_at: float | None = None
    # The key's agent's pause, read in the same query as the key: the check every call makes.
    agent_pause: Pause | None = None


@dataclass(frozen=True, slots=True)
class NewJob:
    """A job as admission builds it, before the store gives it a queue position."""

    id: str
    agent: str
    project: str
    key_id: str
    name: str | None
    backend: str
    shots: int
    circuits: tuple[str, ...]
    qubits: int
    depth: int
    two_qubit_gates: int
    fingerprint: str
    estimate_micro_usd: int
    state: JobState
    priority: int = 1
    idempotency_key: str | None = None
    payload_hash: str | None = None
    dry_run_of: str | None = None
    simulator: bool = True
    pricing_known: bool = True
    qpu_seconds_estimate: float = 0.0
    approval_level: str | None = None
    approval_expires_at: float | None = None
    approved_by: str | None = None
    trace_parent: str | None = None  # the submitting call's W3C traceparent (tracing on), for the worker's spans


@dataclass(frozen=True, slots=True)
class Candidate:
    """A queued job a claim may take, as `may_run` judges it: whose it is, not the whole record
    (the claim's candidates' read carries this much, so judging one costs no read of its own)."""

    id: str
    agent: str
    project: str


# `may_run(candidate, agent_running, project_running)`: may this queued job start, given the running
# jobs of its agent and of its project?
MayRun = Callable[[Candidate, int, int], bool]


@dataclass(frozen=True, slots=True)
class JobRecord:
    seq: int
    id: str
    agent: str
    project: str
    key_id: str
    name: str | None
    backend: str
    shots: int
    circuits: tuple[str, ...]
    n_circuits: int
    qubits: int
    depth: int
    two_qubit_gates: int
    fingerprint: str
    estimate_micro_usd: int
    state: JobState
    version: int
    attempts: int
    runs: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    lease_owner: str | None
    lease_expires: float | None
    provider_ref: str | None
    result: tuple[dict[str, dict[str, int]], ...] | None
    error_code: str | None
    error_message: str | None
    priority: int = 1
    idempotency_key: str | None = None
    payload_hash: str | None = None
    dry_run_of: str | None = None
    simulator: bool = True
    pricing_known: bool = True
    qpu_seconds_estimate: float = 0.0
    actual_cost_micro_usd: int | None = None
    actual_qpu_seconds: float | None = None
    approval_level: str | None = None
    approval_expires_at: float | None = None
    approved_by: str | None = None
    cancelled_by: str | None = None  # 'agent', 'operator <user>' or 'provider', once cancelled
    internal_failures: int = 0  # failures of the gateway itself while running it (each one retried later)
    not_before: float | None = None  # a queued job is not claimed before this (after an internal failure)
    submitted_at: float | None = None  # when its provider accepted it: the wall-clock cap counts from here
    # Its reservation (the `ledger` view shows these as one row per admitted job): reserved at
    # admission in the day and month it counts in, then committed at what it cost, or released.
    ledger_status: str | None = None  # reserved | committed | released
    ledger_day: str | None = None  # UTC 'YYYY-MM-DD' of admission
    ledger_month: str | None = None  # 'YYYY-MM'
    ledger_micro_usd: int | None = None
    ledger_shots: int | None = None
    ledger_qpu_millis: int | None = None
    settled_at: float | None = None
    queued_at: float | None = None  # when it last entered the queue at admission or approval (not a requeue)
    trace_parent: str | None = None  # the submitting call's W3C traceparent, when tracing was on

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        if row.keys() == _JOB_COLUMNS:
            # The usual case, a whole `jobs` row, whose columns are this record's fields in order:
            # built by position, which is twice as fast as by name (70 -> 31 µs a row here).
            values = list(row)
            values[_CIRCUITS] = tuple(json.loads(values[_CIRCUITS]))
            values[_STATE] = JobState(values[_STATE])
            if values[_RESULT] is not None:
                values[_RESULT] = tuple(json.loads(values[_RESULT]))
            values[_SIMULATOR] = bool(values[_SIMULATOR])
            values[_PRICING_KNOWN] = bool(values[_PRICING_KNOWN])
            return cls(*values)
        data = dict(row)
        data["circuits"] = tuple(json.loads(data["circuits"]))
        data["state"] = JobState(data["state"])
        data["result"] = None if data["result"] is None else tuple(json.loads(data["result"]))
        data["simulator"] = bool(data["simulator"])
        data["pricing_known"] = bool(data["pricing_known"])
        return cls(**data)


_JOB_COLUMNS = [field.name for field in fields(JobRecord)]
_CIRCUITS, _STATE, _RESULT, _SIMULATOR, _PRICING_KNOWN = (
    _JOB_COLUMNS.index(name) for name in ("circuits", "state", "result", "simulator", "pricing_known")
)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One decision: who, what, with which arguments (hashed), and how it ended."""

    tool: str
    decision: str  # ok | refused | error | event | held | asked | alert
    agent: str | None = None
    project: str | None = None
    key_id: str | None = None
    error_code: str | None = None
    args_hash: str | None = None
    job_id: str | None = None
    detail: str | None = None
    operator: str | None = None  # the OS user behind an operator act (CLI, or a policy reload)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    seq: int
    at: float
    agent: str | None
    project: str | None
    key_id: str | None
    tool: str
    decision: str
    error_code: str | None
    args_hash: str | None
    job_id: str | None
    detail: str | None
    prev_hash: str | None = None  # the previous row's row_hash (None on rows older than the chain)
    row_hash: str | None = None  # sha256(prev_hash || canonical content), see server/audit/chain.py
    operator: str | None = None  # hashed with the content when set


@dataclass(frozen=True, slots=True)
class JobChange:
    """A committed change of a job, as another process announces it (its version and new state)."""

    job_id: str
    version: int
    state: JobState


@dataclass(frozen=True, slots=True)
class StateUsage:
    state: JobState
    jobs: int
    shots: int


@dataclass(frozen=True, slots=True)
class LiveJobs:
    """Jobs not yet ended in one state on one backend: how many, and the oldest one's start in that
    state (a queued job's entry into the queue; otherwise its admission)."""

    state: JobState
    backend: str
    jobs: int
    oldest_at: float


RETIRED_METRICS = "~retired"  # the metric_snapshots row that sums the processes gone


@dataclass(frozen=True, slots=True)
class MetricSnapshot:
    """One process's counters as it last wrote them (server/telemetry/snapshots.py), or the retired sum."""

    owner: str
    updated_at: float
    samples: str  # JSON


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Committed and reserved amounts of one agent or project, per period, and its job counts."""

    committed: dict[str, tuple[int, int, int]]  # period -> (micro-dollars, shots, QPU milliseconds)
    reserved: dict[str, tuple[int, int, int]]
    queued_jobs: int
    running_jobs: int

    def usage(self) -> Usage:
        """These totals as the quota rules read them (policy/quotas.py)."""
        return Usage(
            committed={period: Amounts(*v) for period, v in self.committed.items()},
            reserved={period: Amounts(*v) for period, v in self.reserved.items()},
            queued_jobs=self.queued_jobs,
            running_jobs=self.running_jobs,
        )


@dataclass(frozen=True, slots=True)
class AdmissionFacts:
    """What admission decides on, read inside the admission transaction."""

    agent: LedgerTotals
    project: LedgerTotals
    repeats: int  # this agent's jobs with the same circuit on the same backend within the loop window
    agent_pause: Pause | None = None  # the agent is paused (its kill switch)
    backend_pause: Pause | None = None  # the backend the job would run on is paused (drained)


@dataclass(frozen=True, slots=True)
class ProcessReport:
    """One serving gateway process as it reports itself to the shared database (every few seconds)."""

    id: str  # host:pid:random, the same as its workers' lease owner
    host: str
    pid: int
    serving: str  # "http 127.0.0.1:8765", "stdio", "in-process"
    started_at: float
    seen_at: float  # its last report: a process not seen for a while has stopped
    policy_path: str
    policy_sha256: str | None  # the policy file in force (None: no file, the shipped default)
    overrides_sha256: str | None  # the overrides file in force (None: none)
    policy_error: str | None  # the file on disk was refused; the last good policy stays in force

    @property
    def policy_stamp(self) -> tuple[str | None, str | None]:
        """What two processes must share to run the same policy: both files' content hashes."""
        return self.policy_sha256, self.overrides_sha256


# -- the console's operators and sessions (migrations sqlite 0010, postgres 0011) ---------------


@dataclass(frozen=True, slots=True)
class OperatorRecord:
    """A person who signs in to the console; never an agent (operators hold no gateway key)."""

    name: str
    role: str  # viewer | approver | admin
    password_hash: str  # scrypt$N$r$p$salt_hex$hash_hex: never the password
    created_at: float
    disabled_at: float | None = None


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A signed-in browser: stored by the sha256 of its id, which only the operator's cookie holds."""

    id_hash: str
    operator: str
    created_at: float
    seen_at: float


# The tables that make an installation, in the order `qpu-gateway db copy` moves them, each with the
# columns its rows are read in order of. What stays behind: `schema_migrations` (the target applies
# its own), PostgreSQL's `installation` id (a new database keeps its own rate-limit namespace) and
# `audit_head` (made again from the copied rows), and the rate-limit counters of SQLite's
# `rate_hits` and `rate_counters` tables, which only ever describe the last minutes; `processes` (each
# serving process reports itself again within seconds) and `shared_secrets` (they seal only the
# elicitation rounds in flight, which a move ends anyway).
INSTALLATION_TABLES = {
    "keys": "id",  # agents' keys (hashes): the old keys keep working
    "pauses": "kind, name",  # an operator's kill switch or drain must not lift itself in a move
    "jobs": "seq",  # every job in every state, with its queue position and its reservation (the `ledger`
    # columns: reserved and committed costs, so budgets carry over exactly)
    "agent_turns": "agent",  # round-robin turns, so fair share does not restart in favour of anyone
    "audit": "seq",  # the hash chain, row for row, hashes untouched
    "operators": "name",  # the console's operators (password hashes, roles); their sessions stay behind
}


@dataclass(frozen=True, slots=True)
class TablePage:
    """A page of one table's rows as a copy moves them: column names, then each row's values in that order."""

    table: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class SchemaState:
    """How a database's applied migrations compare with this version's."""

    applied: tuple[str, ...]
    pending: tuple[str, ...]  # this version's migrations not applied there yet
    unknown: tuple[str, ...]  # applied there but unknown here: a newer gateway's


def ledger_periods(now: float) -> tuple[str, str]:
    """The UTC day and month a reservation made at `now` counts in (the ledger's `day`, `month`)."""
    moment = datetime.fromtimestamp(now, UTC)
    return moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m")


def reservation(job: NewJob, day: str, month: str) -> tuple[str, str, int, int, int]:
    """What an admitted job reserves (its `ledger` columns after the status), in the day and month it
    counts in: its estimate, its shots (every circuit's), its estimated QPU time in milliseconds."""
    return (
        day,
        month,
        job.estimate_micro_usd,
        job.shots * len(job.circuits),
        math.ceil(job.qpu_seconds_estimate * 1000),
    )


def settlement(paid: bool, values: Mapping[str, Any], now: float) -> tuple[Any, ...]:
    """The parameters of a store's settle clause for a move to an end: paid; paid, (sets the cost?,
    cost); paid, (sets QPU time?, its milliseconds rounded up); now. `values` are the move's fields."""
    seconds = values.get("actual_qpu_seconds")
    return (
        *(paid, paid, "actual_cost_micro_usd" in values, values.get("actual_cost_micro_usd")),
        *(paid, "actual_qpu_seconds" in values, None if seconds is None else math.ceil(seconds * 1000), now),
    )


def not_empty(held: Mapping[str, int]) -> str:
    """Why a copy refuses a target that holds rows (`held`: rows per table)."""
    rows = ", ".join(f"{table} {n}" for table, n in held.items() if n)
    return f"the database is not empty ({rows}): a copy goes only into an empty database; nothing was written"


# -- the notifications outbox (migrations sqlite 0009, postgres 0010) ---------------------------
# Not in INSTALLATION_TABLES: an outbox describes deliveries in flight to the webhooks of the policy
# in force, which a move ends like the processes' reports.


@dataclass(frozen=True, slots=True)
class NewNotification:
    """One event for one webhook, as the outbox stores it: the body is what is sent, signed at send time."""

    hook: str  # the webhook's name in the policy (its URL and secret stay in the policy and the environment)
    event: str  # approval_needed | storm | budget | breaker
    body: str  # the JSON text POSTed
    agent: str | None = None
    project: str | None = None
    job_id: str | None = None
    # Sent at most once per hook: a second row with the same key is not stored (a budget crossing).
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class NotificationRecord:
    id: int
    hook: str
    event: str
    dedup_key: str | None
    agent: str | None
    project: str | None
    job_id: str | None
    body: str
    created_at: float
    status: str  # pending | delivered | dead
    attempts: int  # deliveries started (a claim counts one)
    next_attempt_at: float  # when it is due; while leased, when the lease lapses
    lease_owner: str | None
    last_error: str | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Any) -> NotificationRecord:
        return cls(**{f.name: row[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class DeliveryOutcome:
    """How one delivery ended: `delivered`, `pending` again (due at `next_attempt_at`) or `dead`."""

    status: str
    error: str | None = None
    next_attempt_at: float | None = None
