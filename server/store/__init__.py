"""The storage seam: one interface the service, worker and CLI use, whatever database is behind it.

SQLite (`server/store/sqlite.py`) is the embedded default: one file shared by the processes of one
machine. PostgreSQL (`server/store/postgres.py`, through the driver seam in `pg_connector.py`) serves
the same schema to replicas on several machines. `open_store` picks one from the `Database` given.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from qpu_gateway.jobs.states import JobState
from qpu_gateway.policy.decisions import Refusal

if TYPE_CHECKING:
    from qpu_gateway.config import Database

from qpu_gateway.store.records import (
    AdmissionFacts,
    AuditEntry,
    AuditRecord,
    DeliveryOutcome,
    JobChange,
    JobRecord,
    KeyRecord,
    LedgerTotals,
    LiveJobs,
    MayRun,
    MetricSnapshot,
    NewJob,
    NewNotification,
    NotificationRecord,
    OperatorRecord,
    Pause,
    ProcessReport,
    SchemaState,
    SessionRecord,
    StateUsage,
    TablePage,
)


class StoreError(Exception):
    """The database could not do what was asked (locked, read-only, full); safe to show.

    `retry_after_s` is set when the trouble is the database's state rather than the request (busy,
    read-only, full): the call may succeed later, and agents are told when to try again.
    """

    def __init__(self, message: str, *, retry_after_s: float | None = None, kind: str = "error") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.kind = kind  # busy | read_only | full | unavailable | aborted | refused | error: a metric label
        ERRORS[kind] += 1


# StoreErrors raised in this process, by kind (the metric qpu_gateway_store_errors_total).
ERRORS: Counter[str] = Counter()


class Store(Protocol):
    async def close(self) -> None: ...

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        ...

    def rate_namespace(self) -> str:
        """The prefix of this database's rate-limit keys in a storage other installations may share."""
        ...

    async def watch_changes(
        self, on_change: Callable[[JobChange], Awaitable[None]], on_connected: Callable[[], Awaitable[None]]
    ) -> bool:
        """Push every job change any process commits to `on_change`, until cancelled; `on_connected`
        after each (re)connection, to catch up on what was missed. False at once where the database
        has no such feed (SQLite: watchers poll `job_versions`).

        Not pushed back: a change committed through this same store whose caller announces it in
        this process: an admission, a claim, a transition with `owner` (a worker's). The caller
        holds the record already; the push would only wake a worker again or have a waiter read
        the job before it is handed it."""
        ...

    # keys (an operator's change passes `audit`, written in the same transaction)
    async def insert_key(self, key: KeyRecord, audit: AuditEntry | None = None) -> None: ...

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        """The key, with its agent's pause if the agent is paused (read in the same query)."""
        ...

    async def list_keys(self) -> list[KeyRecord]: ...
    async def revoke_key(self, key_id: str, now: float, audit: AuditEntry | None = None) -> bool: ...

    async def rotate_key(self, key_id: str, secret_hash: str, audit: AuditEntry | None = None) -> bool:
        """Replace an active key's secret: the old key stops working at once."""
        ...

    async def touch_key(self, key_id: str, now: float) -> None:
        """Record that the key was just used."""
        ...

    async def key_count(self) -> int: ...

    # pauses (an agent's kill switch, a backend's drain)
    async def pause(self, pause: Pause, audit: AuditEntry) -> Pause | None:
        """Store `pause` with its audit row; if that agent or backend is paused already, return that
        pause and write nothing."""
        ...

    async def resume(self, kind: str, name: str, now: float, audit: AuditEntry) -> Pause | None:
        """Lift a pause with its audit row; return the pause lifted, or None (and write nothing) if none was."""
        ...

    async def pauses(self, kind: str | None = None) -> list[Pause]: ...
    async def pause_of(self, kind: str, name: str) -> Pause | None: ...

    # the console's operators and their sessions (an operator's change passes `audit`, written with it)
    async def insert_operator(self, operator: OperatorRecord, audit: AuditEntry) -> bool:
        """Store a new operator with its audit row; False (and nothing written) if the name is taken."""
        ...

    async def operator(self, name: str) -> OperatorRecord | None: ...
    async def list_operators(self) -> list[OperatorRecord]: ...

    async def disable_operator(self, name: str, now: float, audit: AuditEntry) -> bool:
        """Disable an enabled operator and end its sessions, with its audit row; False if none was enabled."""
        ...

    async def start_session(self, session: SessionRecord, idle_before: float) -> None:
        """Store a new session, deleting every session last seen before `idle_before`."""
        ...

    async def session(self, id_hash: str) -> tuple[SessionRecord, OperatorRecord] | None:
        """The session and its operator (read together), or None."""
        ...

    async def touch_session(self, id_hash: str, now: float) -> None: ...
    async def end_session(self, id_hash: str) -> None: ...

    # processes sharing the database (replicas), and what they must share
    async def report_process(self, report: ProcessReport) -> None:
        """Record (or refresh) a serving process's report."""
        ...

    async def forget_process(self, process_id: str) -> None: ...

    async def processes(self, seen_after: float) -> list[ProcessReport]:
        """The processes that reported after `seen_after`, oldest first."""
        ...

    async def publish_metrics(self, owner: str, samples: str, now: float) -> None:
        """Store this process's counters (JSON), replacing what it stored before."""
        ...

    async def metric_snapshots(self) -> list[MetricSnapshot]:
        """Every process's stored counters, and the retired sum (owner RETIRED_METRICS)."""
        ...

    async def retire_metrics(
        self, stale_before: float, keep: Collection[str], merge: Callable[[list[str]], str], now: float
    ) -> int:
        """In one transaction, add the snapshots last written before `stale_before` by processes not in
        `keep` (those still alive) into the retired row (`merge` sums JSON snapshots, the retired one
        first) and delete them; how many there were."""
        ...

    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        """The installation's secret `name`, storing `candidate` as it if there is none yet (the
        first process to ask wins; every process gets the same value)."""
        ...

    # jobs
    async def admit(
        self,
        job: NewJob,
        audit: AuditEntry,
        now: float,
        *,
        loop_window_s: float,
        decide: Callable[[AdmissionFacts], Refusal | None],
        notify: Callable[[AdmissionFacts], Sequence[NewNotification]] | None = None,
    ) -> tuple[JobRecord, bool] | Refusal:
        """Admit a job in one transaction: read the facts, let `decide` judge them, then store the job,
        its reservation in the ledger and its audit row together, with the outbox rows `notify` makes
        of the same facts.

        With an idempotency key already used by this agent, the earlier job is returned with False
        and nothing is written. A refusal from `decide` is returned and nothing is written.
        """
        ...

    async def ledger_totals(self, column: Literal["agent", "project"], who: str, now: float) -> LedgerTotals: ...

    async def job_by_idempotency_key(self, agent: str, key: str) -> JobRecord | None: ...

    async def has_simulation(self, project: str, fingerprint: str) -> bool:
        """Whether the project has a succeeded simulator run of this circuit fingerprint."""
        ...

    async def pending_approvals(self) -> list[JobRecord]: ...

    async def expired_approvals(self, now: float) -> list[str]: ...

    async def get_job(self, job_id: str) -> JobRecord | None: ...

    async def list_jobs(
        self, *, agent: str | None, state: JobState | None, limit: int, before_seq: int | None
    ) -> list[JobRecord]: ...

    async def job_ids(self, agent: str, prefix: str, limit: int) -> list[str]:
        """The agent's job ids that start with `prefix`, newest first (for completion)."""
        ...

    async def claim(
        self,
        providers: Iterable[str],
        busy_backends: Iterable[str],
        owner: str,
        lease_s: float,
        now: float,
        may_run: MayRun | None = None,
    ) -> JobRecord | None:
        """Take the next claimable job for one of `providers`, skipping `busy_backends`.

        Claimable: queued, or leased by a worker that stopped heartbeating (those first); a paused
        agent's or backend's job only once it is at its provider (to be polled). Then the
        highest priority, and within it the agent whose last job was claimed longest ago, so one
        agent's long queue cannot starve another's. `may_run(candidate, agent_running, project_running)`
        can hold back a queued job whose agent or project is at its running cap (the candidate names the
        job, its agent and its project; the counts are read in the same transaction as the claim).
        """
        ...

    async def claim_many(
        self,
        providers: Iterable[str],
        busy_backends: Iterable[str],
        owner: str,
        lease_s: float,
        now: float,
        may_run: MayRun | None = None,
        *,
        limit: int,
        room: Callable[[str], int] | None = None,
    ) -> list[JobRecord]:
        """Claim up to `limit` jobs in one transaction, each chosen as `claim` chooses, taking no
        more of a backend's jobs than `room(backend)` (then it counts as busy)."""
        ...

    async def heartbeat(self, job_ids: Iterable[str], owner: str, until: float) -> set[str]:
        """Extend leases; return the ids this owner still holds."""
        ...

    async def record_attempt(self, job_id: str, owner: str, audit: AuditEntry | None = None) -> None:
        """One more provider call tried for the job (its worker still holds it), with its timeline row."""
        ...

    async def transition(
        self,
        job_id: str,
        new: JobState,
        now: float,
        *,
        owner: str | None = None,
        fields: Mapping[str, Any] | None = None,
        audit: AuditEntry | None = None,
        from_state: JobState | None = None,
        charge: bool | None = None,
        held: JobRecord | None = None,
    ) -> JobRecord | None:
        """Move a job to `new` if the transition table allows it from its current state.

        With `owner`, only while that worker holds the lease; with `from_state`, only from that
        state. Returns the updated job, or None when the job was not in a state (or lease) that
        allows the move. A move to a terminal state settles the job's reservation in the ledger:
        committed (at the actual figures, else the estimate) for a success or when `charge` is
        True, released otherwise or when `charge` is False. `held` is the job as the lease owner
        last stored it: with it a store may write the move and its audit row in one statement
        (PostgreSQL does; its agent, project and version are what it needs).
        """
        ...

    async def retry_later(self, job_id: str, owner: str, now: float, *, until: float, message: str) -> JobRecord | None:
        """Give back a job this worker holds after a failure of the gateway itself, to run again from `until`.

        Counts the failure (`internal_failures`), shows `message` as the job's `internal_error`
        until it is claimed again, and writes a `job.requeued` audit row. A job not yet at its
        provider is queued again; one at its provider keeps its reference and is polled again.
        None if this worker no longer holds the job.
        """
        ...

    async def release_lease(self, job_id: str, owner: str, *, requeue: bool, now: float) -> bool: ...

    async def hand_back(self, owner: str, now: float) -> int:
        """Give back every job `owner` holds (graceful shutdown): nothing is lost."""
        ...

    async def job_versions(self, job_ids: Iterable[str]) -> dict[str, tuple[int, JobState]]:
        """Each job's version (bumped on every change) and state."""
        ...

    async def usage_by_state(self, agent: str) -> list[StateUsage]: ...

    async def live_jobs(self) -> list[LiveJobs]:
        """Jobs not yet ended, by state and backend, with the oldest one's time (metrics, at a scrape)."""
        ...

    async def active_job_counts(self, column: Literal["agent", "backend"]) -> dict[str, tuple[int, int]]:
        """(waiting, running) jobs per agent or backend that has any: waiting is queued or held for approval."""
        ...

    # audit
    async def append_audit(self, entry: AuditEntry, now: float) -> None: ...

    async def audit_tail(
        self, *, limit: int, job_id: str | None = None, agent: str | None = None, after_seq: int | None = None
    ) -> list[AuditRecord]:
        """The newest `limit` rows (after `after_seq`), oldest first."""
        ...

    async def audit_since(
        self, *, after_seq: int, limit: int, job_id: str | None = None, agent: str | None = None
    ) -> list[AuditRecord]:
        """The oldest `limit` rows after `after_seq`, oldest first: for reading the log forward."""
        ...

    def audit_pages(self, *, after_seq: int = 0, page_size: int = 1000) -> AsyncGenerator[list[AuditRecord]]:
        """Every row after `after_seq` in seq order, a page at a time (the connection is free between pages)."""
        ...

    async def audit_highest_seq(self) -> int:
        """The highest seq the audit log ever assigned; deleting the last rows does not lower it."""
        ...

    # the notifications outbox (`server/telemetry/outbox.py` delivers it)
    async def enqueue_notifications(self, rows: Sequence[NewNotification], now: float) -> int:
        """Store `rows`, due now; a row whose dedup key is stored already is skipped. Returns the rows stored."""
        ...

    async def claim_notifications(
        self, owner: str, lease_until: float, now: float, limit: int
    ) -> list[NotificationRecord]:
        """Take up to `limit` pending rows due at `now` for `owner` until `lease_until`, counting an
        attempt on each; a row is claimed by one process at a time (a lapsed claim may be taken again)."""
        ...

    async def finish_notification(
        self, notification_id: int, owner: str, outcome: DeliveryOutcome, now: float, audit: AuditEntry
    ) -> bool:
        """Record a delivery's outcome with its audit row in one transaction, if `owner` still holds
        the row; False (and nothing written) otherwise."""
        ...

    async def release_notifications(self, owner: str, now: float) -> int:
        """Give back the rows `owner` holds (shutdown mid-delivery), due at once, their attempt uncounted."""
        ...

    async def notifications(self, *, status: str | None = None, limit: int = 100) -> list[NotificationRecord]:
        """The newest `limit` outbox rows (of one status), newest first."""
        ...

    # moving an installation (`qpu-gateway db copy`): the tables are records.INSTALLATION_TABLES
    async def schema_state(self) -> SchemaState:
        """This database's applied migrations against this version's (it may be opened unmigrated)."""
        ...

    async def row_counts(self) -> dict[str, int]:
        """How many rows each of INSTALLATION_TABLES holds."""
        ...

    def export_rows(self, *, page_size: int = 1000) -> AsyncGenerator[TablePage]:
        """Every row of INSTALLATION_TABLES, table by table in that order, a page at a time, all from
        one snapshot (a read transaction held until the generator is closed); writes nothing."""
        ...

    async def import_rows(
        self,
        pages: AsyncIterable[TablePage],
        *,
        now: float,
        audit: Callable[[Mapping[str, int]], AuditEntry] | None = None,
    ) -> dict[str, int]:
        """Insert `pages` in one transaction into this database, which must hold no row of
        INSTALLATION_TABLES (else StoreError, and nothing is written): rows as given, seqs and hashes
        included; then new jobs' seqs and the audit chain continue after the copied ones, and
        `audit(rows per table)` is appended to the chain. All or nothing; returns the rows per table."""
        ...


async def open_store(location: Database | Path, *, migrate: bool = True) -> Store:
    """Open the store at `location` (a SQLite file, created if needed, or a PostgreSQL database) and
    bring its schema up to date."""
    from qpu_gateway.config import Database

    database = location if isinstance(location, Database) else Database(path=location)
    store: Store
    if database.url is not None:
        from qpu_gateway.store.postgres import PostgresStore

        store = await PostgresStore.open(database.url)
    else:
        from qpu_gateway.store.sqlite import SqliteStore

        assert database.path is not None
        store = await SqliteStore.open(database.path)
    try:
        if migrate:
            await store.migrate()
    except BaseException:
        await store.close()
        raise
    return store


def store_initialised(location: Database | Path) -> bool:
    """True if a gateway database has been set up at `location` (`qpu-gateway init` or any open).

    For PostgreSQL, raises StoreError (unavailable) when the server cannot be reached.
    """
    from qpu_gateway.config import Database

    database = location if isinstance(location, Database) else Database(path=location)
    if database.url is not None:
        from qpu_gateway.store.postgres import initialised as pg_initialised

        return pg_initialised(database.url)
    from qpu_gateway.store.sqlite import initialised

    assert database.path is not None
    return initialised(database.path)
