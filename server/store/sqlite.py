"""The SQLite store: a writer and a reader per process on aiosqlite's threads, WAL, short IMMEDIATE transactions.

Several gateway processes may share one database file (every Claude Code session starts its
own stdio server). Every write takes SQLite's write lock up front (`BEGIN IMMEDIATE`), so a
claim is a single guarded UPDATE that two processes can never both win. Each store operation
runs as one function on its connection's thread: one hop from the event loop per transaction,
not one per statement; most reads need none, on a third connection on the loop's own thread.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import closing, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal, TypeVar

import aiosqlite
import anyio

from qpu_gateway.audit.chain import GENESIS, chain_hash
from qpu_gateway.jobs.states import TERMINAL, JobState, sources_of
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.store import StoreError, observer
from qpu_gateway.store.records import (
    INSTALLATION_TABLES,
    RETIRED_METRICS,
    AdmissionFacts,
    AuditEntry,
    AuditRecord,
    Candidate,
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
    ledger_periods,
    not_empty,
    reservation,
    settlement,
)
from qpu_gateway.store.sqlite_thread import (
    Busy,
    GroupWriter,
    Work,
    on_thread,
    quick_connection,
    read_here_first,
    rollback,
    trace_async,
    would_wait,
    write_gate,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Columns a transition may set besides the state; anything else is a programming error.
_SETTABLE = (
    "started_at",
    "finished_at",
    "provider_ref",
    "result",
    "error_code",
    "error_message",
    "lease_owner",
    "lease_expires",
    "actual_cost_micro_usd",
    "actual_qpu_seconds",
    "approved_by",
    "cancelled_by",
    "submitted_at",
    "queued_at",
)
# Each settable column takes a (set it?, value) pair of parameters, in _SETTABLE order.
_TRANSITION = """
UPDATE jobs SET state = ?, version = version + 1, updated_at = ?,
    started_at = CASE WHEN ? THEN ? ELSE started_at END,
    finished_at = CASE WHEN ? THEN ? ELSE finished_at END,
    provider_ref = CASE WHEN ? THEN ? ELSE provider_ref END,
    result = CASE WHEN ? THEN ? ELSE result END,
    error_code = CASE WHEN ? THEN ? ELSE error_code END,
    error_message = CASE WHEN ? THEN ? ELSE error_message END,
    lease_owner = CASE WHEN ? THEN ? ELSE lease_owner END,
    lease_expires = CASE WHEN ? THEN ? ELSE lease_expires END,
    actual_cost_micro_usd = CASE WHEN ? THEN ? ELSE actual_cost_micro_usd END,
    actual_qpu_seconds = CASE WHEN ? THEN ? ELSE actual_qpu_seconds END,
    approved_by = CASE WHEN ? THEN ? ELSE approved_by END,
    cancelled_by = CASE WHEN ? THEN ? ELSE cancelled_by END,
    submitted_at = CASE WHEN ? THEN ? ELSE submitted_at END,
    queued_at = CASE WHEN ? THEN ? ELSE queued_at END,
    {settle}
WHERE id = ? AND state IN (SELECT value FROM json_each(?)) AND (? IS NULL OR lease_owner = ?)
RETURNING *
"""
# A job that ends settles its reservation in the UPDATE that ends it: a success (or an end the
# provider charged for, such as a timed-out job it had started) commits the actual figures (the
# estimate where the provider reported none), anything else releases it. The right-hand sides
# read the row as it was, so the actual cost and QPU time are this move's where it sets them, else
# those the row had (QPU seconds rounded up to milliseconds: SQLite has no ceil() of its own).
# Parameters: paid; paid, (sets the cost?, cost); paid, (sets QPU time?, its milliseconds); now.
_SETTLE = """ledger_status = CASE WHEN ledger_status = 'reserved' THEN
        CASE WHEN ? THEN 'committed' ELSE 'released' END ELSE ledger_status END,
    ledger_micro_usd = CASE WHEN ledger_status = 'reserved' AND ?
        THEN coalesce(CASE WHEN ? THEN ? ELSE actual_cost_micro_usd END, ledger_micro_usd)
        ELSE ledger_micro_usd END,
    ledger_qpu_millis = CASE WHEN ledger_status = 'reserved' AND ?
        THEN coalesce(CASE WHEN ? THEN ? ELSE CAST(actual_qpu_seconds * 1000 AS INTEGER)
                      + (actual_qpu_seconds * 1000 > CAST(actual_qpu_seconds * 1000 AS INTEGER)) END,
                      ledger_qpu_millis)
        ELSE ledger_qpu_millis END,
    settled_at = CASE WHEN ledger_status = 'reserved' THEN ? ELSE settled_at END"""
_TRANSITION_SETTLE = _TRANSITION.replace("{settle}", _SETTLE)
_TRANSITION = _TRANSITION.replace(",\n    {settle}", "")
# A reservation's sums by status: today's, this month's and all time's (cost, shots, QPU milliseconds).
_SUMS = """ledger_status,
    coalesce(sum(CASE WHEN ledger_day = :day THEN ledger_micro_usd END), 0),
    coalesce(sum(CASE WHEN ledger_day = :day THEN ledger_shots END), 0),
    coalesce(sum(CASE WHEN ledger_day = :day THEN ledger_qpu_millis END), 0),
    coalesce(sum(CASE WHEN ledger_month = :month THEN ledger_micro_usd END), 0),
    coalesce(sum(CASE WHEN ledger_month = :month THEN ledger_shots END), 0),
    coalesce(sum(CASE WHEN ledger_month = :month THEN ledger_qpu_millis END), 0),
    coalesce(sum(ledger_micro_usd), 0), coalesce(sum(ledger_shots), 0), coalesce(sum(ledger_qpu_millis), 0)"""
_TOTALS = """
SELECT {sums}
FROM jobs WHERE {column} = :who AND ledger_status IN ('reserved', 'committed') GROUP BY ledger_status
"""
_TOTALS_BY = {
    "agent": _TOTALS.replace("{column}", "agent").replace("{sums}", _SUMS),
    "project": _TOTALS.replace("{column}", "project").replace("{sums}", _SUMS),
}
_COUNTS_BY = {
    "agent": "SELECT coalesce(sum(state IN ('queued', 'pending_approval')), 0), "
    "coalesce(sum(state IN ('submitting', 'running')), 0) FROM jobs WHERE agent = ? "
    "AND state IN ('queued', 'pending_approval', 'submitting', 'running')",
    "project": "SELECT coalesce(sum(state IN ('queued', 'pending_approval')), 0), "
    "coalesce(sum(state IN ('submitting', 'running')), 0) FROM jobs WHERE project = ? "
    "AND state IN ('queued', 'pending_approval', 'submitting', 'running')",
}
# Waiting (queued or held for approval) and running jobs per agent or backend, for operators' lists.
# Everything admission decides on, in one statement of tagged rows: the agent's and the project's
# ledger sums (one row per status, as `_TOTALS`), their waiting and running jobs (as `_COUNTS_BY`),
# the loop guard's count of recent repeats, and the agent's or backend's pause if any.
_WAITING_RUNNING = """coalesce(sum(state IN ('queued', 'pending_approval')), 0),
    coalesce(sum(state IN ('submitting', 'running')), 0), 0, 0, 0, 0, 0, 0, 0"""
_ACTIVE_STATES = "state IN ('queued', 'pending_approval', 'submitting', 'running')"
_ADMISSION_FACTS = (
    """
SELECT 'agent', {sums} FROM jobs WHERE agent = :agent AND ledger_status IN ('reserved', 'committed')
GROUP BY ledger_status
UNION ALL
SELECT 'project', {sums} FROM jobs WHERE project = :project AND ledger_status IN ('reserved', 'committed')
GROUP BY ledger_status
UNION ALL
SELECT 'agent_jobs', NULL, {waiting_running} FROM jobs WHERE agent = :agent AND {active}
UNION ALL
SELECT 'project_jobs', NULL, {waiting_running} FROM jobs WHERE project = :project AND {active}
UNION ALL
SELECT 'repeats', NULL, count(*), 0, 0, 0, 0, 0, 0, 0, 0 FROM jobs
WHERE agent = :agent AND backend = :backend AND fingerprint = :fingerprint AND created_at > :since
UNION ALL
SELECT 'pause', kind, name, reason, paused_by, paused_at, 0, 0, 0, 0, 0 FROM pauses
WHERE (kind = 'agent' AND name = :agent) OR (kind = 'backend' AND name = :backend)
""".replace("{sums}", _SUMS)
    .replace("{waiting_running}", _WAITING_RUNNING)
    .replace("{active}", _ACTIVE_STATES)
)
_ACTIVE = (
    "SELECT {column}, sum(state IN ('queued', 'pending_approval')), sum(state IN ('submitting', 'running')) "
    "FROM jobs WHERE state IN ('queued', 'pending_approval', 'submitting', 'running') GROUP BY {column}"
)
_ACTIVE_BY = {"agent": _ACTIVE.replace("{column}", "agent"), "backend": _ACTIVE.replace("{column}", "backend")}
# A queued job is claimable once its `not_before` (set after an internal failure) has passed; a
# leased one once its lease has lapsed (the time is the same parameter, given twice). Both claim
# queries leave out a paused agent's or backend's jobs that would go to a provider (queued, or
# reclaimed before the provider took them); one already at a provider is still claimed, to be
# polled to its end.
#
# Each candidate comes with what its claim needs, so judging and taking it costs no read of its own:
# for a queued one when `may_run` judges (the first parameter), its agent's and project's running
# jobs (read in this same transaction, after every claim committed before); its agent's turn, and
# the latest turn of any agent with how many agents hold it (read once a statement: uncorrelated),
# so a claim whose agent already has the one latest turn need not write it again. (`+r.project`: a
# project's running jobs are found through the state, among the running jobs, not by walking every
# job the project ever had.)
_CLAIM_CANDIDATES = """
SELECT j.seq, j.state, j.agent, j.id, j.project, t.last_claimed_at,
    CASE WHEN ? AND j.state = 'queued' THEN
        (SELECT count(*) FROM jobs r WHERE r.agent = j.agent AND r.state IN ('submitting', 'running')) END,
    CASE WHEN ? AND j.state = 'queued' THEN
        (SELECT count(*) FROM jobs r WHERE r.state IN ('submitting', 'running') AND +r.project = j.project) END,
    (SELECT max(last_claimed_at) FROM agent_turns),
    (SELECT count(*) FROM agent_turns WHERE last_claimed_at = (SELECT max(last_claimed_at) FROM agent_turns))
FROM jobs j LEFT JOIN agent_turns t ON t.agent = j.agent
WHERE ((j.state = 'queued' AND coalesce(j.not_before, 0) <= ?)
       OR (j.state IN ('submitting', 'running') AND j.lease_expires < ?))
  AND substr(j.backend, 1, instr(j.backend, '/') - 1) IN (SELECT value FROM json_each(?))
  AND j.backend NOT IN (SELECT value FROM json_each(?))
  AND (j.state != 'queued' OR j.agent NOT IN (SELECT value FROM json_each(?)))
  AND (NOT EXISTS (SELECT 1 FROM pauses) OR j.provider_ref IS NOT NULL
       OR (j.agent NOT IN (SELECT name FROM pauses WHERE kind = 'agent')
           AND j.backend NOT IN (SELECT name FROM pauses WHERE kind = 'backend')))
ORDER BY j.state != 'queued' DESC, j.priority DESC, coalesce(t.last_claimed_at, 0), j.seq
LIMIT ?
"""
# Whether a claim could take anything: read first, so a worker polling an empty queue (every
# process does, twice a second) takes no write lock.
_ANY_CLAIMABLE = """
SELECT 1 FROM jobs j
WHERE ((j.state = 'queued' AND coalesce(j.not_before, 0) <= ?)
       OR (j.state IN ('submitting', 'running') AND j.lease_expires < ?))
  AND substr(j.backend, 1, instr(j.backend, '/') - 1) IN (SELECT value FROM json_each(?))
  AND j.backend NOT IN (SELECT value FROM json_each(?))
  AND (NOT EXISTS (SELECT 1 FROM pauses) OR j.provider_ref IS NOT NULL
       OR (j.agent NOT IN (SELECT name FROM pauses WHERE kind = 'agent')
           AND j.backend NOT IN (SELECT name FROM pauses WHERE kind = 'backend')))
LIMIT 1
"""
_CANDIDATES_LIMIT = 64
_CLAIM_ONE = """
UPDATE jobs SET
    state = CASE WHEN state = 'queued' THEN 'submitting' ELSE state END,
    lease_owner = ?, lease_expires = ?, version = version + 1, updated_at = ?,
    runs = runs + 1, started_at = coalesce(started_at, ?),
    attempts = attempts + (provider_ref IS NULL),  -- the submission this claim is for
    error_code = NULL, error_message = NULL  -- what an earlier internal failure left: it runs again
WHERE seq = ?
  AND ((state = 'queued' AND coalesce(not_before, 0) <= ?)
       OR (state IN ('submitting', 'running') AND lease_expires < ?))
RETURNING *
"""
_INSERT_JOB = (
    "INSERT INTO jobs (id, agent, project, key_id, name, backend, shots, circuits, n_circuits, "
    "qubits, depth, two_qubit_gates, fingerprint, estimate_micro_usd, state, created_at, updated_at, "
    "priority, idempotency_key, payload_hash, dry_run_of, simulator, pricing_known, "
    "qpu_seconds_estimate, approval_level, approval_expires_at, approved_by, "
    "queued_at, trace_parent, "
    "ledger_status, ledger_day, ledger_month, ledger_micro_usd, ledger_shots, ledger_qpu_millis) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "'reserved', ?, ?, ?, ?, ?) RETURNING *"
)
# A key with its agent's pause, if any: one indexed query per call whether or not anyone is paused.
_KEYS = (
    "SELECT k.*, p.reason AS pause_reason, p.paused_by, p.paused_at FROM keys k "
    "LEFT JOIN pauses p ON p.kind = 'agent' AND p.name = k.agent"
)
_PAUSE = "SELECT * FROM pauses WHERE kind = ? AND name = ?"
_OPERATOR = "SELECT name, role, password_hash, created_at, disabled_at FROM operators"
# Jobs not yet ended by state and backend, and the oldest one's time: an index range over the live
# states only, however many ended jobs the table holds.
_LIVE_JOBS = (
    "SELECT state, backend, count(*), min(CASE WHEN state = 'queued' THEN coalesce(queued_at, created_at) "
    "ELSE created_at END) FROM jobs WHERE state IN ('pending_approval', 'queued', 'submitting', 'running') "
    "GROUP BY state, backend"
)
# The outbox (migration 0009). A claimed row's next_attempt_at is its lease's end: a claimer that dies
# leaves the row due again then, and another process takes it (at least once, never lost).
_INSERT_NOTIFICATION = (
    "INSERT INTO notifications (hook, event, dedup_key, agent, project, job_id, body, created_at, next_attempt_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (dedup_key) DO NOTHING"
)
_NOTIFICATION_DUE = "SELECT 1 FROM notifications WHERE status = 'pending' AND next_attempt_at <= ? LIMIT 1"
_CLAIM_NOTIFICATIONS = (
    "UPDATE notifications SET lease_owner = ?, next_attempt_at = ?, attempts = attempts + 1 WHERE id IN "
    "(SELECT id FROM notifications WHERE status = 'pending' AND next_attempt_at <= ? "
    "ORDER BY next_attempt_at, id LIMIT ?) RETURNING *"
)
_FINISH_NOTIFICATION = (
    "UPDATE notifications SET status = ?, next_attempt_at = ?, last_error = ?, lease_owner = NULL, "
    "finished_at = CASE WHEN ? = 'pending' THEN NULL ELSE ? END "
    "WHERE id = ? AND lease_owner = ? AND status = 'pending'"
)
_RELEASE_NOTIFICATIONS = (
    "UPDATE notifications SET lease_owner = NULL, next_attempt_at = ?, attempts = max(attempts - 1, 0) "
    "WHERE lease_owner = ? AND status = 'pending'"
)
_NOTIFICATIONS = "SELECT * FROM notifications WHERE (? IS NULL OR status = ?) ORDER BY id DESC LIMIT ?"
_BY_IDEMPOTENCY_KEY = "SELECT * FROM jobs WHERE agent = ? AND idempotency_key = ?"
_NO_CURSOR = 2**62
_LIST_JOBS = {
    (True, True): "SELECT * FROM jobs WHERE agent = ? AND state = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    (True, False): "SELECT * FROM jobs WHERE agent = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    (False, True): "SELECT * FROM jobs WHERE state = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
    (False, False): "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
}
# How long a store call waits for the database (another process's write lock, or this process's
# connection busy with other calls) before it is refused as busy. Tunable for operators whose
# backups or maintenance hold the lock longer, and shortened by the chaos suite.
ENV_BUSY_TIMEOUT = "QPU_GATEWAY_BUSY_TIMEOUT_S"
DEFAULT_BUSY_TIMEOUT_S = 10.0


def _busy_timeout_s() -> float:
    return float(os.environ.get(ENV_BUSY_TIMEOUT) or DEFAULT_BUSY_TIMEOUT_S)


_BUSY = "The gateway database is busy (another process holds its write lock); nothing was written. Try again shortly."
# One audit row in one statement: the next seq and the hash to chain to are read, and the row's hash
# computed (`audit_row_hash`, the chain's own `chain_hash` registered as a SQL function on the
# writing connection), inside the INSERT, so no other writer can come between. The seq comes
# from AUTOINCREMENT's counter, not max(seq): a deleted last row then leaves a gap the verifier
# sees, instead of its seq being reused and the chain continuing as if nothing had been cut off.
_INSERT_AUDIT = """
INSERT INTO audit (seq, at, agent, project, key_id, tool, decision, error_code, args_hash, job_id, detail,
                   operator, prev_hash, row_hash)
SELECT head.seq, :at, :agent, :project, :key_id, :tool, :decision, :error_code, :args_hash, :job_id, :detail,
       :operator, head.prev,
       audit_row_hash(head.prev, head.seq, :at, :agent, :project, :key_id, :tool, :decision, :error_code,
                      :args_hash, :job_id, :detail, :operator)
FROM (SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0),
                 coalesce((SELECT max(seq) FROM audit), 0)) + 1 AS seq,
             -- the first row, or the first after rows older than the chain, links to the genesis
             coalesce((SELECT row_hash FROM audit ORDER BY seq DESC LIMIT 1), :genesis) AS prev) AS head
"""


def _audit_row_hash(prev_hash: str, seq: int, at: float, *values: str | None) -> str:
    """`chain_hash` of one row, as the SQL function `audit_row_hash` (arguments in `_INSERT_AUDIT`'s order)."""
    content: dict[str, Any] = {"seq": seq, "at": at, **dict(zip(_AUDIT_TEXT, values, strict=True))}
    return chain_hash(prev_hash, content)


_AUDIT_TEXT = (
    "agent",
    "project",
    "key_id",
    "tool",
    "decision",
    "error_code",
    "args_hash",
    "job_id",
    "detail",
    "operator",
)


async def _connect(path: Path, busy_s: float) -> aiosqlite.Connection:
    try:
        conn = await aiosqlite.connect(str(path), isolation_level=None, timeout=busy_s)
    except sqlite3.Error as exc:
        raise _store_error(exc) from None
    conn.row_factory = aiosqlite.Row
    await trace_async(conn)
    await conn.create_function("audit_row_hash", 2 + 1 + len(_AUDIT_TEXT), _audit_row_hash, deterministic=True)
    return conn


def _read_only(path: Path) -> bool:
    """True if the database's folder is on a read-only mount, or the file or folder is not writable."""
    if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
        return True
    return not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK))


# The database holds key hashes, every job's circuits and results, and the audit log: readable by
# its owner only, like `local.key`. SQLite gives the -wal and -shm files the database file's mode.
_PRIVATE = 0o600
_COMPANIONS = ("", "-wal", "-shm")


def _private_file(path: Path) -> None:
    """Create the database file 0600, and narrow an existing one (and its WAL files) to 0600."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _PRIVATE))
        return
    except FileExistsError:
        pass  # an existing database, or another process created it a moment ago
    except OSError:
        return  # SQLite's own open reports what is wrong, with the store's message
    for suffix in _COMPANIONS:
        each = path.with_name(path.name + suffix)
        try:
            info = each.stat()
            if info.st_mode & 0o777 & ~_PRIVATE and info.st_uid == os.geteuid():
                os.chmod(each, _PRIVATE)
                log.warning(
                    "narrowed %s from mode %o to 0600: it holds key hashes and the audit log",
                    each,
                    info.st_mode & 0o777,
                    extra={"path": str(each)},
                )
        except OSError:
            continue  # absent (no WAL yet), or not ours: SQLite decides whether it can open it


def initialised(path: Path) -> bool:
    """True if `path` is a gateway database that `qpu-gateway init` (or any migration) has set up."""
    if not path.is_file():
        return False
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=1.0)) as db:
            row = db.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            return bool(row[0]) and db.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] > 0
    except sqlite3.Error:
        return True  # it exists but cannot be read now (locked, say): opening it reports what is wrong


@contextmanager
def _as_store_errors() -> Iterator[None]:
    """SQLite's errors, and a call withdrawn for want of patience, as the StoreError an operator reads."""
    try:
        yield
    except Busy:
        raise StoreError(_BUSY, retry_after_s=1.0, kind="busy") from None
    except sqlite3.Error as exc:
        raise _store_error(exc) from None


def _store_error(exc: sqlite3.Error) -> StoreError:
    if would_wait(exc):
        return StoreError(_BUSY, retry_after_s=1.0, kind="busy")
    text = str(exc).lower()
    if "readonly" in text or "read-only" in text:
        return StoreError(
            "The gateway database is read-only; nothing was written. The operator must make its disk or file writable.",
            retry_after_s=60.0,
            kind="read_only",
        )
    if "full" in text:
        return StoreError(
            "The disk holding the gateway database is full; nothing was written. The operator must free space.",
            retry_after_s=60.0,
            kind="full",
        )
    return StoreError(f"database error: {exc}")


@observer.operations()
class SqliteStore:
    def __init__(
        self,
        conn: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        busy_s: float = DEFAULT_BUSY_TIMEOUT_S,
        gate: threading.Lock | None = None,
        quick: sqlite3.Connection | None = None,
    ) -> None:
        self._conn = conn
        self._busy_s = busy_s
        # One writing connection per process; its transactions run on its thread in groups.
        self._writer = GroupWriter(conn, gate or threading.Lock(), busy_s)
        # Plain reads (a job, a key, a page of jobs) go through a second connection, so a tool
        # call's reads do not queue behind the workers' write transactions (WAL lets readers and
        # the writer work at once; each read sees the last committed state).
        self._reader = reader
        # Most reads are a few rows by index, far quicker than a hop to a thread and back; they run
        # on the event loop's thread through a connection that never waits (no busy handler).
        self._quick = quick
        # A job was queued through this store since the last claim: the claim then goes straight to
        # its write instead of first reading whether anything is claimable (the read that keeps an
        # idle worker's poll from taking the write lock).
        self._queued_here = False

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        if not path.parent.exists():
            # The folder holds the database and `local.key`: nobody else's to list.
            path.parent.mkdir(parents=True, mode=0o700)
        if _read_only(path):
            # Said up front: on a read-only disk SQLite may open the file and fail only at the
            # first write (or fail with "unable to open"), neither of which tells the operator why.
            raise StoreError(
                f"The gateway database {path} is on a read-only disk or is not writable; the gateway must "
                "write its jobs and audit rows. Make it writable, or use --db to put it elsewhere.",
                retry_after_s=60.0,
            )
        _private_file(path)
        busy_s = _busy_timeout_s()
        conn = await _connect(path, busy_s)
        opened = [conn]
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_s * 1000)}")
            # Switching a brand-new file to WAL can fail at once with "locked" while another
            # process is creating it (the busy timeout does not cover it); it is safe to repeat.
            deadline = time.monotonic() + busy_s
            while True:
                try:
                    await conn.execute("PRAGMA journal_mode = WAL")
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc).lower() or time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.05)
            # FULL: a job reported as queued survives power loss, not only a process crash.
            await conn.execute("PRAGMA synchronous = FULL")
            reader = await _connect(path, busy_s)
            opened.append(reader)
            await reader.execute("PRAGMA query_only = 1")
            # In WAL mode readers do not wait for writers, so a read meets "locked" only in rare
            # moments (a process recovering the WAL after a crash); it then goes to the reader.
            quick = quick_connection(path, "query_only = 1")
        except BaseException as exc:
            # A connection's worker thread would otherwise keep the process from exiting.
            with anyio.CancelScope(shield=True):
                for each in opened:
                    await each.close()
            if isinstance(exc, sqlite3.Error):
                raise _store_error(exc) from None
            raise
        return cls(conn, reader, busy_s, write_gate(path), quick)

    async def close(self) -> None:
        if self._quick is not None:
            self._quick.close()
        with anyio.CancelScope(shield=True):
            await self._reader.close()
            await self._conn.close()

    async def _read(self, work: Work[T]) -> T:
        """Run `work` (plain reads) on this thread if the file lets it read at once, else on the
        reader's thread (one hop, whatever it reads)."""
        with _as_store_errors():
            return await read_here_first(self._quick, self._reader, work, self._busy_s)

    async def _write(self, work: Work[T], *, single_statement: bool = False) -> T:
        """Run `work` in a write transaction on the writer's thread (committed with whatever other
        writes are waiting then; see `server/store/sqlite_thread.py`): all of it or none. A work of
        `single_statement` needs no transaction of its own when it is the only write waiting."""
        with _as_store_errors():
            return await self._writer.run(work, single_statement=single_statement)

    # -- migrations -------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        scripts = sorted(
            (entry.name, entry.read_text(encoding="utf-8"))
            for entry in resources.files("qpu_gateway.store.migrations.sqlite").iterdir()
            if entry.name.endswith(".sql")
        )

        def work(db: sqlite3.Connection) -> list[str]:
            applied: list[str] = []
            db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {row[0] for row in db.execute("SELECT name FROM schema_migrations")}
            for name, script in scripts:
                if name in done:
                    continue
                for statement in _statements(script):
                    db.execute(statement)
                db.execute("INSERT INTO schema_migrations (name, applied_at) VALUES (?, ?)", (name, time.time()))
                applied.append(name)
            return applied

        return await self._write(work)

    def rate_namespace(self) -> str:
        # The prefix rate-limit keys always had: counts kept in Redis before this existed still count.
        return "qpu"

    async def watch_changes(
        self, on_change: Callable[[JobChange], Awaitable[None]], on_connected: Callable[[], Awaitable[None]]
    ) -> bool:
        return False  # SQLite has no notifications between processes: watchers poll job_versions

    # -- keys -------------------------------------------------------------------------------

    async def insert_key(self, key: KeyRecord, audit: AuditEntry | None = None) -> None:
        params = (
            key.id,
            key.secret_hash,
            key.agent,
            key.project,
            ",".join(sorted(key.scopes)),
            key.created_at,
            key.expires_at,
        )
        await self._write(
            _with_audit(
                _run(
                    "INSERT INTO keys (id, secret_hash, agent, project, scopes, created_at, expires_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    params,
                ),
                audit,
                key.created_at,
            )
        )

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        row = await self._read(_first(_KEYS + " WHERE k.id = ?", (key_id,)))
        return _key(row) if row is not None else None

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._read(_all(_KEYS + " ORDER BY k.created_at, k.id"))
        return [_key(row) for row in rows]

    async def revoke_key(self, key_id: str, now: float, audit: AuditEntry | None = None) -> bool:
        changed = await self._write(
            _with_audit(
                _run("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (now, key_id)), audit, now
            )
        )
        return changed == 1

    async def rotate_key(self, key_id: str, secret_hash: str, audit: AuditEntry | None = None) -> bool:
        changed = await self._write(
            _with_audit(
                _run("UPDATE keys SET secret_hash = ? WHERE id = ? AND revoked_at IS NULL", (secret_hash, key_id)),
                audit,
                time.time(),
            )
        )
        return changed == 1

    async def touch_key(self, key_id: str, now: float) -> None:
        await self._write(_run("UPDATE keys SET last_used_at = ? WHERE id = ?", (now, key_id)), single_statement=True)

    async def key_count(self) -> int:
        row = await self._read(_first("SELECT count(*) FROM keys"))
        assert row is not None
        return int(row[0])

    # -- pauses -----------------------------------------------------------------------------

    async def pause(self, pause: Pause, audit: AuditEntry) -> Pause | None:
        def work(db: sqlite3.Connection) -> Pause | None:
            earlier = db.execute(_PAUSE, (pause.kind, pause.name)).fetchone()
            if earlier is not None:
                return Pause(*earlier)
            db.execute(
                "INSERT INTO pauses (kind, name, reason, paused_by, paused_at) VALUES (?, ?, ?, ?, ?)",
                (pause.kind, pause.name, pause.reason, pause.paused_by, pause.paused_at),
            )
            _insert_audit(db, audit, pause.paused_at)
            return None

        return await self._write(work)

    async def resume(self, kind: str, name: str, now: float, audit: AuditEntry) -> Pause | None:
        def work(db: sqlite3.Connection) -> Pause | None:
            row = db.execute("DELETE FROM pauses WHERE kind = ? AND name = ? RETURNING *", (kind, name)).fetchone()
            if row is None:
                return None
            _insert_audit(db, audit, now)
            return Pause(*row)

        return await self._write(work)

    async def pauses(self, kind: str | None = None) -> list[Pause]:
        rows = await self._read(
            _all("SELECT * FROM pauses WHERE ? IS NULL OR kind = ? ORDER BY kind, paused_at", (kind, kind))
        )
        return [Pause(*row) for row in rows]

    async def pause_of(self, kind: str, name: str) -> Pause | None:
        row = await self._read(_first(_PAUSE, (kind, name)))
        return Pause(*row) if row is not None else None

    # -- the console's operators and sessions -----------------------------------------------

    async def insert_operator(self, operator: OperatorRecord, audit: AuditEntry) -> bool:
        params = (operator.name, operator.role, operator.password_hash, operator.created_at)
        changed = await self._write(
            _with_audit(
                _run(
                    "INSERT OR IGNORE INTO operators (name, role, password_hash, created_at) VALUES (?, ?, ?, ?)",
                    params,
                ),
                audit,
                operator.created_at,
            )
        )
        return changed == 1

    async def operator(self, name: str) -> OperatorRecord | None:
        row = await self._read(_first(_OPERATOR + " WHERE name = ?", (name,)))
        return OperatorRecord(*row) if row is not None else None

    async def list_operators(self) -> list[OperatorRecord]:
        return [OperatorRecord(*row) for row in await self._read(_all(_OPERATOR + " ORDER BY name"))]

    async def disable_operator(self, name: str, now: float, audit: AuditEntry) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            changed = db.execute(
                "UPDATE operators SET disabled_at = ? WHERE name = ? AND disabled_at IS NULL", (now, name)
            ).rowcount
            if not changed:
                return False
            db.execute("DELETE FROM operator_sessions WHERE operator = ?", (name,))
            _insert_audit(db, audit, now)
            return True

        return await self._write(work)

    async def start_session(self, session: SessionRecord, idle_before: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM operator_sessions WHERE seen_at < ?", (idle_before,))
            db.execute(
                "INSERT INTO operator_sessions (id_hash, operator, created_at, seen_at) VALUES (?, ?, ?, ?)",
                dataclasses.astuple(session),
            )

        await self._write(work)

    async def session(self, id_hash: str) -> tuple[SessionRecord, OperatorRecord] | None:
        row = await self._read(
            _first(
                "SELECT s.id_hash, s.operator, s.created_at, s.seen_at, o.name, o.role, o.password_hash, "
                "o.created_at, o.disabled_at FROM operator_sessions s JOIN operators o ON o.name = s.operator "
                "WHERE s.id_hash = ?",
                (id_hash,),
            )
        )
        return None if row is None else (SessionRecord(*row[:4]), OperatorRecord(*row[4:]))

    async def touch_session(self, id_hash: str, now: float) -> None:
        await self._write(
            _run("UPDATE operator_sessions SET seen_at = ? WHERE id_hash = ?", (now, id_hash)), single_statement=True
        )

    async def end_session(self, id_hash: str) -> None:
        await self._write(_run("DELETE FROM operator_sessions WHERE id_hash = ?", (id_hash,)), single_statement=True)

    # -- processes --------------------------------------------------------------------------

    async def report_process(self, report: ProcessReport) -> None:
        await self._write(
            _run(
                "INSERT OR REPLACE INTO processes (id, host, pid, serving, started_at, seen_at, policy_path, "
                "policy_sha256, overrides_sha256, policy_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(report),
            )
        )

    async def forget_process(self, process_id: str) -> None:
        await self._write(_run("DELETE FROM processes WHERE id = ?", (process_id,)))

    async def processes(self, seen_after: float) -> list[ProcessReport]:
        rows = await self._read(
            _all(
                "SELECT id, host, pid, serving, started_at, seen_at, policy_path, policy_sha256, overrides_sha256, "
                "policy_error FROM processes WHERE seen_at > ? ORDER BY started_at, id",
                (seen_after,),
            )
        )
        return [ProcessReport(*row) for row in rows]

    async def publish_metrics(self, owner: str, samples: str, now: float) -> None:
        await self._write(
            _run(
                "INSERT OR REPLACE INTO metric_snapshots (owner, updated_at, samples) VALUES (?, ?, ?)",
                (owner, now, samples),
            ),
            single_statement=True,
        )

    async def metric_snapshots(self) -> list[MetricSnapshot]:
        rows = await self._read(_all("SELECT owner, updated_at, samples FROM metric_snapshots ORDER BY owner"))
        return [MetricSnapshot(str(r[0]), float(r[1]), str(r[2])) for r in rows]

    async def retire_metrics(
        self, stale_before: float, keep: Collection[str], merge: Callable[[list[str]], str], now: float
    ) -> int:
        alive = set(keep)

        def work(db: sqlite3.Connection) -> int:
            stale = [
                row
                for row in db.execute(
                    "SELECT owner, samples FROM metric_snapshots WHERE updated_at < ? AND owner != ?",
                    (stale_before, RETIRED_METRICS),
                ).fetchall()
                if row[0] not in alive
            ]
            if not stale:
                return 0
            kept = db.execute("SELECT samples FROM metric_snapshots WHERE owner = ?", (RETIRED_METRICS,)).fetchone()
            merged = merge(([str(kept[0])] if kept else []) + [str(row[1]) for row in stale])
            db.execute(
                "INSERT OR REPLACE INTO metric_snapshots (owner, updated_at, samples) VALUES (?, ?, ?)",
                (RETIRED_METRICS, now, merged),
            )
            db.executemany("DELETE FROM metric_snapshots WHERE owner = ?", [(row[0],) for row in stale])
            return len(stale)

        return await self._write(work)

    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        def work(db: sqlite3.Connection) -> bytes:
            db.execute(
                "INSERT OR IGNORE INTO shared_secrets (name, value, created_at) VALUES (?, ?, ?)",
                (name, candidate, time.time()),
            )
            return bytes(db.execute("SELECT value FROM shared_secrets WHERE name = ?", (name,)).fetchone()[0])

        return await self._write(work)

    # -- jobs -------------------------------------------------------------------------------

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
        day, month = ledger_periods(now)

        def work(db: sqlite3.Connection) -> tuple[JobRecord, bool] | Refusal:
            if job.idempotency_key is not None:
                earlier = db.execute(_BY_IDEMPOTENCY_KEY, (job.agent, job.idempotency_key)).fetchone()
                if earlier is not None:
                    return JobRecord.from_row(earlier), False
            # Read here, under the write lock, so no job is admitted once a pause has committed, and
            # each admission sees every reservation made before it.
            facts = _admission_facts(db, job, now - loop_window_s, day, month)
            refusal = decide(facts)
            if refusal is not None:
                return refusal
            # The job with its reservation (its `ledger` columns), then its audit row.
            row = db.execute(_INSERT_JOB, (*_job_params(job, now), *reservation(job, day, month))).fetchone()
            self._queued_here = self._queued_here or job.state is JobState.QUEUED
            if notify is not None:
                _insert_notifications(db, notify(facts), now)
            _insert_audit(db, audit, now)
            return JobRecord.from_row(row), True

        return await self._write(work)

    async def ledger_totals(self, column: Literal["agent", "project"], who: str, now: float) -> LedgerTotals:
        day, month = ledger_periods(now)
        return await self._read(lambda db: _totals(db, column, who, day, month))

    async def job_by_idempotency_key(self, agent: str, key: str) -> JobRecord | None:
        row = await self._read(_first(_BY_IDEMPOTENCY_KEY, (agent, key)))
        return JobRecord.from_row(row) if row is not None else None

    async def has_simulation(self, project: str, fingerprint: str) -> bool:
        row = await self._read(
            _first(
                "SELECT 1 FROM jobs WHERE project = ? AND fingerprint = ? AND state = 'succeeded' "
                "AND simulator = 1 LIMIT 1",
                (project, fingerprint),
            )
        )
        return row is not None

    async def pending_approvals(self) -> list[JobRecord]:
        rows = await self._read(_all("SELECT * FROM jobs WHERE state = 'pending_approval' ORDER BY seq"))
        return [JobRecord.from_row(row) for row in rows]

    async def expired_approvals(self, now: float) -> list[str]:
        rows = await self._read(
            _all(
                "SELECT id FROM jobs WHERE state = 'pending_approval' AND approval_expires_at < ? ORDER BY seq", (now,)
            )
        )
        return [row[0] for row in rows]

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._read(_first("SELECT * FROM jobs WHERE id = ?", (job_id,)))
        return JobRecord.from_row(row) if row is not None else None

    async def list_jobs(
        self, *, agent: str | None, state: JobState | None, limit: int, before_seq: int | None
    ) -> list[JobRecord]:
        # One static statement per filter combination, so each can use its index.
        query = _LIST_JOBS[(agent is not None, state is not None)]
        params: list[object] = [p for p in (agent, state.value if state else None) if p is not None]
        params += [_NO_CURSOR if before_seq is None else before_seq, limit]
        rows = await self._read(_all(query, params))
        return [JobRecord.from_row(row) for row in rows]

    async def job_ids(self, agent: str, prefix: str, limit: int) -> list[str]:
        # Walks the agent's jobs newest first (jobs_agent_seq) until `limit` match; reads ids only.
        rows = await self._read(
            _all(
                "SELECT id FROM jobs WHERE agent = ? AND substr(id, 1, length(?)) = ? ORDER BY seq DESC LIMIT ?",
                (agent, prefix, prefix, limit),
            )
        )
        return [str(row[0]) for row in rows]

    async def claim(
        self,
        providers: Iterable[str],
        busy_backends: Iterable[str],
        owner: str,
        lease_s: float,
        now: float,
        may_run: MayRun | None = None,
    ) -> JobRecord | None:
        jobs = await self.claim_many(providers, busy_backends, owner, lease_s, now, may_run, limit=1)
        return jobs[0] if jobs else None

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
        names = json.dumps(sorted(set(providers)))
        skipped = sorted(set(busy_backends))
        if names == "[]" or limit < 1:
            return []
        queued_here, self._queued_here = self._queued_here, False
        if not queued_here and await self._read(_first(_ANY_CLAIMABLE, (now, now, names, json.dumps(skipped)))) is None:
            return []

        def work(db: sqlite3.Connection) -> list[JobRecord]:
            claimer = _Claimer(db, owner, lease_s, now, may_run)
            busy = set(skipped)
            taken: Counter[str] = Counter()
            jobs: list[JobRecord] = []
            while len(jobs) < limit:
                # Each claim of a batch takes its turn a microsecond after the one before, so agents
                # still take turns within one batch (turns are ordered by time).
                turn = now + len(jobs) * 1e-6
                job, more = claimer.next(names, json.dumps(sorted(busy)), turn)
                if job is not None:
                    jobs.append(job)
                    taken[job.backend] += 1
                    if room is not None and taken[job.backend] >= room(job.backend):
                        busy.add(job.backend)
                if not more:
                    break
            return jobs

        return await self._write(work)

    async def heartbeat(self, job_ids: Iterable[str], owner: str, until: float) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        rows = await self._write(
            _all(
                "UPDATE jobs SET lease_expires = ? WHERE lease_owner = ? AND id IN (SELECT value FROM json_each(?)) "
                "AND state IN ('submitting', 'running') RETURNING id",
                (until, owner, json.dumps(ids)),
            ),
            single_statement=True,
        )
        return {row[0] for row in rows}

    async def record_attempt(self, job_id: str, owner: str, audit: AuditEntry | None = None) -> None:
        if audit is None:
            await self._write(
                _run("UPDATE jobs SET attempts = attempts + 1 WHERE id = ? AND lease_owner = ?", (job_id, owner)),
                single_statement=True,
            )
            return

        def work(db: sqlite3.Connection) -> None:
            moved = db.execute(
                "UPDATE jobs SET attempts = attempts + 1 WHERE id = ? AND lease_owner = ?", (job_id, owner)
            ).rowcount
            if moved:  # the row tells of an attempt that happened: not if the job was taken from this worker
                _insert_audit(db, audit, time.time())

        await self._write(work)

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
        held: JobRecord | None = None,  # SQLite writes a table a statement: no use for it here
    ) -> JobRecord | None:
        values = dict(fields or {})
        unknown = set(values) - set(_SETTABLE)
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}")
        if values.get("result") is not None:
            values["result"] = json.dumps(values["result"])
        pairs = [x for column in _SETTABLE for x in (column in values, values.get(column))]
        allowed = sources_of(new) if from_state is None else sources_of(new) & {from_state}
        sources = json.dumps(sorted(s.value for s in allowed))
        entry = audit or AuditEntry(tool=f"job.{new.value}", decision="event")

        if new in TERMINAL:
            settle = settlement(new is JobState.SUCCEEDED if charge is None else charge, values, now)
            statement = _TRANSITION_SETTLE
        else:
            settle, statement = (), _TRANSITION
        params = (new.value, now, *pairs, *settle, job_id, sources, owner, owner)

        def work(db: sqlite3.Connection) -> JobRecord | None:
            row = db.execute(statement, params).fetchone()
            if row is None:
                return None
            job = JobRecord.from_row(row)
            _insert_audit(
                db,
                AuditEntry(
                    tool=entry.tool,
                    decision=entry.decision,
                    agent=entry.agent or job.agent,
                    project=entry.project or job.project,
                    key_id=entry.key_id,
                    error_code=entry.error_code or job.error_code,
                    args_hash=entry.args_hash,
                    job_id=job.id,
                    detail=entry.detail,
                    operator=entry.operator,
                ),
                now,
            )
            return job

        return await self._write(work)

    async def retry_later(self, job_id: str, owner: str, now: float, *, until: float, message: str) -> JobRecord | None:
        def work(db: sqlite3.Connection) -> JobRecord | None:
            # Not at the provider yet: queued, claimable from `until`. At the provider: the lease
            # is handed to nobody until `until`, after which any worker polls it (never resubmits).
            row = db.execute(
                "UPDATE jobs SET state = CASE WHEN provider_ref IS NULL THEN 'queued' ELSE state END, "
                "lease_owner = NULL, lease_expires = CASE WHEN provider_ref IS NULL THEN NULL ELSE ? END, "
                "not_before = ?, internal_failures = internal_failures + 1, "
                "error_code = 'internal_error', error_message = ?, version = version + 1, updated_at = ? "
                "WHERE id = ? AND lease_owner = ? AND state IN ('submitting', 'running') RETURNING *",
                (until, until, message, now, job_id, owner),
            ).fetchone()
            if row is None:
                return None
            job = JobRecord.from_row(row)
            _insert_audit(
                db,
                AuditEntry(
                    tool="job.requeued",
                    decision="event",
                    agent=job.agent,
                    project=job.project,
                    error_code="internal_error",
                    job_id=job.id,
                    detail=message[:500],
                ),
                now,
            )
            return job

        return await self._write(work)

    async def release_lease(self, job_id: str, owner: str, *, requeue: bool, now: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            if not requeue:
                # lease_expires 0: any worker may claim it again (and will poll, not resubmit).
                cursor = db.execute(
                    "UPDATE jobs SET lease_owner = NULL, lease_expires = 0 WHERE id = ? AND lease_owner = ?",
                    (job_id, owner),
                )
                return cursor.rowcount == 1
            rows = db.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
                "provider_ref = NULL, version = version + 1, updated_at = ? "
                "WHERE id = ? AND lease_owner = ? AND state IN ('submitting', 'running') "
                "RETURNING agent, project",
                (now, job_id, owner),
            ).fetchall()
            for agent, project in rows:
                _insert_audit(
                    db,
                    AuditEntry(
                        tool="job.requeued",
                        decision="event",
                        agent=agent,
                        project=project,
                        job_id=job_id,
                        detail="the provider no longer knows the job; it runs again",
                    ),
                    now,
                )
            return bool(rows)

        return await self._write(work)

    async def hand_back(self, owner: str, now: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            # Not yet at the provider: back in the queue. Already at the provider: keep the
            # reference and drop the lease, so the next worker polls instead of resubmitting.
            requeued = db.execute(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
                "version = version + 1, updated_at = ? "
                "WHERE lease_owner = ? AND state IN ('submitting', 'running') AND provider_ref IS NULL "
                "RETURNING id, agent, project",
                (now, owner),
            ).fetchall()
            released = db.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_expires = 0, version = version + 1, updated_at = ? "
                "WHERE lease_owner = ? AND state IN ('submitting', 'running') RETURNING id, agent, project",
                (now, owner),
            ).fetchall()
            for rows, what in ((requeued, "queued again"), (released, "left with the provider, lease released")):
                for row in rows:
                    _insert_audit(
                        db,
                        AuditEntry(
                            tool="job.handed_back",
                            decision="event",
                            agent=row[1],
                            project=row[2],
                            job_id=row[0],
                            detail=f"worker {owner} stopped: {what}",
                        ),
                        now,
                    )
            return len(requeued) + len(released)

        return await self._write(work)

    async def job_versions(self, job_ids: Iterable[str]) -> dict[str, tuple[int, JobState]]:
        ids = list(job_ids)
        if not ids:
            return {}
        rows = await self._read(
            _all("SELECT id, version, state FROM jobs WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(ids),))
        )
        return {row[0]: (int(row[1]), JobState(row[2])) for row in rows}

    async def live_jobs(self) -> list[LiveJobs]:
        rows = await self._read(_all(_LIVE_JOBS))
        return [LiveJobs(JobState(r[0]), str(r[1]), int(r[2]), float(r[3])) for r in rows]

    async def active_job_counts(self, column: Literal["agent", "backend"]) -> dict[str, tuple[int, int]]:
        rows = await self._read(_all(_ACTIVE_BY[column]))
        return {row[0]: (int(row[1]), int(row[2])) for row in rows}

    async def usage_by_state(self, agent: str) -> list[StateUsage]:
        rows = await self._read(
            _all(
                "SELECT state, count(*), coalesce(sum(shots * n_circuits), 0) FROM jobs WHERE agent = ? "
                "GROUP BY state ORDER BY state",
                (agent,),
            )
        )
        return [StateUsage(JobState(row[0]), int(row[1]), int(row[2])) for row in rows]

    # -- notifications outbox ------------------------------------------------------------

    async def enqueue_notifications(self, rows: Sequence[NewNotification], now: float) -> int:
        if not rows:
            return 0
        return await self._write(lambda db: _insert_notifications(db, rows, now))

    async def claim_notifications(
        self, owner: str, lease_until: float, now: float, limit: int
    ) -> list[NotificationRecord]:
        # An idle outbox (the usual case) is a read, not the write lock, at every process's poll.
        if await self._read(_first(_NOTIFICATION_DUE, (now,))) is None:
            return []
        # One guarded UPDATE under the write lock: two processes can never both take a row.
        rows = await self._write(lambda db: _all(_CLAIM_NOTIFICATIONS, (owner, lease_until, now, limit))(db))
        return sorted((NotificationRecord.from_row(r) for r in rows), key=lambda n: n.id)

    async def finish_notification(
        self, notification_id: int, owner: str, outcome: DeliveryOutcome, now: float, audit: AuditEntry
    ) -> bool:
        params = (outcome.status, outcome.next_attempt_at or now, outcome.error, outcome.status, now)
        work = _run(_FINISH_NOTIFICATION, (*params, notification_id, owner))
        return bool(await self._write(_with_audit(work, audit, now)))

    async def release_notifications(self, owner: str, now: float) -> int:
        return await self._write(_run(_RELEASE_NOTIFICATIONS, (now, owner)), single_statement=True)

    async def notifications(self, *, status: str | None = None, limit: int = 100) -> list[NotificationRecord]:
        rows = await self._read(_all(_NOTIFICATIONS, (status, status, limit)))
        return [NotificationRecord.from_row(r) for r in rows]

    # -- audit ------------------------------------------------------------------------------

    async def append_audit(self, entry: AuditEntry, now: float) -> None:
        await self._write(lambda db: _insert_audit(db, entry, now), single_statement=True)

    async def audit_tail(
        self, *, limit: int, job_id: str | None = None, agent: str | None = None, after_seq: int | None = None
    ) -> list[AuditRecord]:
        rows = await self._read(
            _all(
                "SELECT * FROM (SELECT * FROM audit WHERE (? IS NULL OR job_id = ?) AND (? IS NULL OR agent = ?) "
                "AND seq > ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (job_id, job_id, agent, agent, after_seq or 0, limit),
            )
        )
        return [AuditRecord(**dict(row)) for row in rows]

    async def audit_since(
        self, *, after_seq: int, limit: int, job_id: str | None = None, agent: str | None = None
    ) -> list[AuditRecord]:
        rows = await self._read(
            _all(
                "SELECT * FROM audit WHERE seq > ? AND (? IS NULL OR job_id = ?) AND (? IS NULL OR agent = ?) "
                "ORDER BY seq LIMIT ?",
                (after_seq, job_id, job_id, agent, agent, limit),
            )
        )
        return [AuditRecord(**dict(row)) for row in rows]

    async def audit_pages(self, *, after_seq: int = 0, page_size: int = 1000) -> AsyncGenerator[list[AuditRecord]]:
        while page := await self.audit_since(after_seq=after_seq, limit=page_size):
            yield page
            after_seq = page[-1].seq

    async def audit_highest_seq(self) -> int:
        row = await self._read(
            _first(
                "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0), "
                "coalesce((SELECT max(seq) FROM audit), 0))"
            )
        )
        assert row is not None
        return int(row[0])

    # -- moving an installation (`qpu-gateway db copy`) ---------------------------------------

    async def schema_state(self) -> SchemaState:
        def work(db: sqlite3.Connection) -> list[str]:
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone():
                return [row[0] for row in db.execute("SELECT name FROM schema_migrations ORDER BY name")]
            return []

        return _schema_state(await self._read(work), _migration_names())

    async def row_counts(self) -> dict[str, int]:
        row = await self._read(_first(_ROW_COUNTS))
        assert row is not None
        return {table: int(row[i]) for i, table in enumerate(INSTALLATION_TABLES)}

    async def export_rows(self, *, page_size: int = 1000) -> AsyncGenerator[TablePage]:
        # One read transaction on the reader connection for every table: in WAL mode it reads one
        # snapshot throughout, and writers in other processes carry on meanwhile.
        reader = self._reader
        with _as_store_errors():
            await reader.execute("BEGIN")
        try:
            for table, order in INSTALLATION_TABLES.items():
                with _as_store_errors():
                    cursor = await reader.execute(f"SELECT * FROM {table} ORDER BY {order}")  # noqa: S608 (constants)
                    columns = tuple(d[0] for d in cursor.description)
                try:
                    while True:
                        with _as_store_errors():
                            rows = await cursor.fetchmany(page_size)
                        if not rows:
                            break
                        yield TablePage(table, columns, [tuple(row) for row in rows])
                finally:
                    await cursor.close()
        finally:
            with anyio.CancelScope(shield=True), _as_store_errors():
                await reader.execute("COMMIT")

    async def import_rows(
        self,
        pages: AsyncIterable[TablePage],
        *,
        now: float,
        audit: Callable[[Mapping[str, int]], AuditEntry] | None = None,
    ) -> dict[str, int]:
        # One BEGIN IMMEDIATE ... COMMIT held across every page (the writer's thread runs each step;
        # GroupWriter's one-function transactions cannot wait for pages the event loop reads). The
        # process's write gate is held throughout, so no other write of this process lands inside.
        gate = self._writer._gate
        counts = dict.fromkeys(INSTALLATION_TABLES, 0)

        def begin(db: sqlite3.Connection) -> dict[str, set[str]]:
            if not gate.acquire(timeout=self._busy_s):
                raise sqlite3.OperationalError("database is locked (by another writer of this process)")
            try:
                db.execute("BEGIN IMMEDIATE")
                held = dict(zip(INSTALLATION_TABLES, db.execute(_ROW_COUNTS).fetchone(), strict=True))
                if any(held.values()):
                    raise StoreError(not_empty(held), kind="refused")
                return {
                    table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")}  # constants
                    for table in INSTALLATION_TABLES
                }
            except BaseException:
                rollback(db)
                gate.release()
                raise

        def finish(db: sqlite3.Connection) -> None:
            if audit is not None:
                _insert_audit(db, audit(counts), now)
            db.execute("COMMIT")  # AUTOINCREMENT counters followed the explicit seqs by themselves

        with _as_store_errors():
            columns = await on_thread(self._conn, begin)
        try:
            async for page in pages:
                insert = _insert_page_sql(page, columns)
                with _as_store_errors():
                    await on_thread(self._conn, functools.partial(_insert_page, insert, page.rows))
                counts[page.table] += len(page.rows)
            with _as_store_errors():
                await on_thread(self._conn, finish)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await on_thread(self._conn, rollback)
            raise
        finally:
            gate.release()
        return counts


# -- work done on a connection's thread ------------------------------------------------------


def _run(sql: str, params: Iterable[Any] = ()) -> Callable[[sqlite3.Connection], int]:
    """One statement; the work returns how many rows it changed."""
    return lambda db: db.execute(sql, tuple(params)).rowcount


def _first(sql: str, params: Iterable[Any] = ()) -> Callable[[sqlite3.Connection], sqlite3.Row | None]:
    return lambda db: db.execute(sql, tuple(params)).fetchone()


def _all(sql: str, params: Iterable[Any] = ()) -> Callable[[sqlite3.Connection], list[sqlite3.Row]]:
    return lambda db: db.execute(sql, tuple(params)).fetchall()


@dataclass(frozen=True, slots=True)
class _Claimer:
    """One worker's claim round, inside its write transaction."""

    db: sqlite3.Connection
    owner: str
    lease_s: float
    now: float
    may_run: MayRun | None

    def next(self, providers: str, busy: str, turn: float) -> tuple[JobRecord | None, bool]:
        """Claim the next claimable job; `turn` is when its agent's turn is recorded as taken.

        Also says whether another could be claimable now: not when the job taken was the last of
        fewer candidates than the query's limit (the candidates only shrink as a round goes on:
        claimed jobs leave, held-back agents stay held back, busy backends stay busy).
        """
        # Agents held back by `may_run` are excluded and the candidates read again, so one agent
        # at its running cap with a long queue cannot hide everyone else's jobs.
        refused_agents: set[str] = set()
        while True:
            held = json.dumps(sorted(refused_agents))
            judged = self.may_run is not None
            params = (judged, judged, self.now, self.now, providers, busy, held, _CANDIDATES_LIMIT)
            candidates = self.db.execute(_CLAIM_CANDIDATES, params).fetchall()
            if not candidates:
                return None, False
            held_back = len(refused_agents)
            job, last = self._take_first(candidates, refused_agents, turn)
            if job is not None:
                return job, not (last and len(candidates) < _CANDIDATES_LIMIT)
            if len(refused_agents) == held_back:  # nobody new was held back: nothing else can run
                return None, False

    def _take_first(
        self, candidates: list[sqlite3.Row], refused_agents: set[str], turn: float
    ) -> tuple[JobRecord | None, bool]:
        """Claim the first candidate that may run, and say whether it was the last candidate; agents
        found at their cap are added to `refused_agents`.

        Candidates are rows of `_CLAIM_CANDIDATES`: only the job taken is read and decoded whole.
        """
        db, now = self.db, self.now
        for index, (seq, state, agent, job_id, project, *turns) in enumerate(candidates):
            own_turn, agent_running, project_running, last_turn, holding_last = turns
            reclaim = state != JobState.QUEUED.value
            if not reclaim and self.may_run is not None:
                if agent in refused_agents:
                    continue
                if not self.may_run(Candidate(job_id, agent, project), int(agent_running), int(project_running)):
                    refused_agents.add(agent)
                    continue
            # A queued job becomes `submitting`; a job whose worker stopped heartbeating keeps
            # its state (submitting or running) and changes hands, so a provider job already
            # accepted is polled again rather than sent twice.
            row = db.execute(_CLAIM_ONE, (self.owner, now + self.lease_s, now, now, seq, now, now)).fetchone()
            if row is None:
                continue
            job = JobRecord.from_row(row)
            # Turns only order agents against each other: an agent that alone holds the latest turn
            # stays last in the rotation whether or not its turn moves on, so it is written only
            # when another agent's turn is as late (or later), or the agent has none yet.
            if own_turn is None or own_turn != last_turn or holding_last != 1:
                db.execute(
                    "INSERT INTO agent_turns (agent, last_claimed_at) VALUES (?, ?) "
                    "ON CONFLICT (agent) DO UPDATE SET last_claimed_at = excluded.last_claimed_at",
                    (job.agent, turn),
                )
            _insert_audit(
                db,
                AuditEntry(
                    tool="job.claimed",
                    decision="event",
                    agent=job.agent,
                    project=job.project,
                    job_id=job.id,
                    detail=f"worker {self.owner}, run {job.runs}",
                ),
                now,
            )
            return job, index == len(candidates) - 1
        return None, True


def _job_params(job: NewJob, now: float) -> tuple[Any, ...]:
    return (
        job.id,
        job.agent,
        job.project,
        job.key_id,
        job.name,
        job.backend,
        job.shots,
        json.dumps(list(job.circuits)),
        len(job.circuits),
        job.qubits,
        job.depth,
        job.two_qubit_gates,
        job.fingerprint,
        job.estimate_micro_usd,
        job.state.value,
        now,
        now,
        job.priority,
        job.idempotency_key,
        job.payload_hash,
        job.dry_run_of,
        int(job.simulator),
        int(job.pricing_known),
        job.qpu_seconds_estimate,
        job.approval_level,
        job.approval_expires_at,
        job.approved_by,
        now if job.state is JobState.QUEUED else None,
        job.trace_parent,
    )


def _counts(db: sqlite3.Connection, column: Literal["agent", "project"], who: str) -> tuple[int, int]:
    queued, running = db.execute(_COUNTS_BY[column], (who,)).fetchone()
    return int(queued), int(running)


def _totals(
    db: sqlite3.Connection, column: Literal["agent", "project"], who: str, day: str, month: str
) -> LedgerTotals:
    committed: dict[str, tuple[int, int, int]] = {}
    reserved: dict[str, tuple[int, int, int]] = {}
    for row in db.execute(_TOTALS_BY[column], {"day": day, "month": month, "who": who}):
        values = [int(v) for v in tuple(row)[1:]]
        target = committed if row[0] == "committed" else reserved
        target.update(day=tuple(values[0:3]), month=tuple(values[3:6]), total=tuple(values[6:9]))  # type: ignore[arg-type]
    queued, running = _counts(db, column, who)
    return LedgerTotals(committed=committed, reserved=reserved, queued_jobs=queued, running_jobs=running)


def _admission_facts(db: sqlite3.Connection, job: NewJob, since: float, day: str, month: str) -> AdmissionFacts:
    """The facts `admit` decides on, read in one statement (`_ADMISSION_FACTS`)."""
    params = {
        "agent": job.agent,
        "project": job.project,
        "backend": job.backend,
        "fingerprint": job.fingerprint,
        "since": since,
        "day": day,
        "month": month,
    }
    sums: dict[str, tuple[dict[str, tuple[int, int, int]], dict[str, tuple[int, int, int]]]] = {
        "agent": ({}, {}),
        "project": ({}, {}),
    }
    jobs = {"agent_jobs": (0, 0), "project_jobs": (0, 0)}
    repeats = 0
    pauses: dict[str, Pause] = {}
    for part, status, *values in db.execute(_ADMISSION_FACTS, params):
        if part in sums:
            numbers = [int(v) for v in values]
            committed, reserved = sums[part]
            target = committed if status == "committed" else reserved
            target.update(day=tuple(numbers[0:3]), month=tuple(numbers[3:6]), total=tuple(numbers[6:9]))  # type: ignore[arg-type]
        elif part in jobs:
            jobs[part] = (int(values[0]), int(values[1]))
        elif part == "repeats":
            repeats = int(values[0])
        else:
            pauses[status] = Pause(status, *values[:4])
    totals = {
        who: LedgerTotals(
            committed=sums[who][0],
            reserved=sums[who][1],
            queued_jobs=jobs[f"{who}_jobs"][0],
            running_jobs=jobs[f"{who}_jobs"][1],
        )
        for who in ("agent", "project")
    }
    return AdmissionFacts(
        agent=totals["agent"],
        project=totals["project"],
        repeats=repeats,
        agent_pause=pauses.get("agent"),
        backend_pause=pauses.get("backend"),
    )


def _insert_audit(db: sqlite3.Connection, entry: AuditEntry, now: float) -> None:
    """Append one row, chained to the row with the highest seq (exact across processes: the
    caller holds the write lock from BEGIN IMMEDIATE, so no other writer comes between)."""
    params = {name: getattr(entry, name) for name in _AUDIT_TEXT}
    db.execute(_INSERT_AUDIT, {**params, "at": float(now), "genesis": GENESIS})


def _insert_notifications(db: sqlite3.Connection, rows: Sequence[NewNotification], now: float) -> int:
    stored = 0
    for n in rows:
        params = (n.hook, n.event, n.dedup_key, n.agent, n.project, n.job_id, n.body, now, now)
        stored += db.execute(_INSERT_NOTIFICATION, params).rowcount
    return stored


def _key(row: Any) -> KeyRecord:
    data = dict(row)
    data["scopes"] = frozenset(s for s in data["scopes"].split(",") if s)
    reason, by, at = data.pop("pause_reason"), data.pop("paused_by"), data.pop("paused_at")
    if at is not None:
        data["agent_pause"] = Pause("agent", data["agent"], reason, by, at)
    return KeyRecord(**data)


def _with_audit(work: Callable[[sqlite3.Connection], int], audit: AuditEntry | None, now: float) -> Work[int]:
    """`work`, and `audit` in the same transaction if it changed a row (an operator's act on a key)."""

    def run(db: sqlite3.Connection) -> int:
        changed = work(db)
        if changed and audit is not None:
            _insert_audit(db, audit, now)
        return changed

    return run


def _statements(script: str) -> list[str]:
    """Split a migration into statements, keeping trigger bodies (which hold ';') whole."""
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if not buffer and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        raise ValueError("migration ends in an incomplete statement")
    return statements


# -- moving an installation --------------------------------------------------------------------

_ROW_COUNTS = "SELECT " + ", ".join(f"(SELECT count(*) FROM {table})" for table in INSTALLATION_TABLES)  # noqa: S608


def _migration_names() -> list[str]:
    return sorted(
        entry.name
        for entry in resources.files("qpu_gateway.store.migrations.sqlite").iterdir()
        if entry.name.endswith(".sql")
    )


def _schema_state(applied: list[str], known: list[str]) -> SchemaState:
    return SchemaState(
        applied=tuple(applied),
        pending=tuple(name for name in known if name not in applied),
        unknown=tuple(name for name in applied if name not in known),
    )


def _insert_page_sql(page: TablePage, columns: Mapping[str, set[str]]) -> str:
    """The INSERT for a page's rows; its table and columns must be this schema's (names are checked,
    never taken on trust from the other database)."""
    if page.table not in columns:
        raise StoreError(f"{page.table!r} is not a table a copy moves")
    foreign = [name for name in page.columns if name not in columns[page.table]]
    if foreign:
        raise StoreError(
            f"the source's {page.table} rows have columns this database does not ({', '.join(foreign)}): "
            "bring both to the same version (`qpu-gateway db migrate`); nothing was written"
        )
    names = ", ".join(f'"{name}"' for name in page.columns)
    marks = ", ".join("?" for _ in page.columns)
    return f"INSERT INTO {page.table} ({names}) VALUES ({marks})"  # noqa: S608 (checked names)


def _insert_page(sql: str, rows: list[tuple[Any, ...]], db: sqlite3.Connection) -> None:
    db.executemany(sql, rows)
