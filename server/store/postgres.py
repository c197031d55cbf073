"""The PostgreSQL store: the Store protocol on a database every replica shares, through a driver seam.

The same semantics as `server/store/sqlite.py`, where SQLite's single writer is replaced by locks
that serialise only what must be serialised:

- Admission takes transaction-scoped advisory locks on the job's project and then its agent
  (always in that order, so two admissions cannot deadlock) before it reads the ledger totals,
  job counts, idempotency key and loop guard, and holds them to its commit. Two admissions that
  could change each other's decision (same agent, or same project) run one after the other, so a
  budget is exact across replicas; admissions of unrelated agents and projects run side by side.
  Row locks could not do this: the totals are sums over rows, and the row that would break a
  budget is one not yet inserted. SERIALIZABLE could, at the price of failing and retrying most
  of 200 concurrent submits.
- Claims take candidate jobs `FOR UPDATE SKIP LOCKED`, so replicas claiming at once take
  different jobs without waiting for each other's rows. Before claiming a job the claimer also
  holds a claim lock (advisory) on its agent, and for a queued job whose running caps must be
  checked on its project too: running caps then hold across replicas (the running jobs are
  counted under the lock, after the other claimer committed), and an agent's round-robin turn row
  is written by one claimer at a time. The first locks of a transaction are waited for, later
  ones only tried (a job whose lock is taken waits for the next round), which rules out deadlocks
  (see `_Claimer._claim_locks`).
- The audit chain has one head row (`audit_head`), locked `FOR UPDATE` by each append, as the last
  statement of its transaction: appends from every replica queue there, each chained to the one
  before, and the lock is held only for the hash and the insert.

Job changes reach other processes by LISTEN/NOTIFY (a trigger on `jobs`, delivered at commit).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, TypeVar

import anyio

from qpu_gateway.audit.chain import GENESIS, canonical
from qpu_gateway.jobs.states import TERMINAL, JobState, sources_of
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.store import StoreError, observer
from qpu_gateway.store.pg_connector import Connector, Retry, Row, Statement, Tx
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

log = logging.getLogger(__name__)
T = TypeVar("T")

CHANNEL = "qpu_jobs"  # what the jobs trigger notifies (migration 0001)
# Advisory lock classes (the first key of pg_advisory_xact_lock(int, int)); the second key is
# hashtext(name): a collision of two names only makes them wait for each other, never wrong.
_LOCK_PROJECT = 0x51500001
_LOCK_AGENT = 0x51500002
_LOCK_MIGRATIONS = 0x51500003
_CLAIM_PROJECT = 0x51500004  # claims' own: a claim never waits for an admission, nor one for it
_CLAIM_AGENT = 0x51500005
_OWN_KEPT = 10_000
# How often a transaction the server aborted as a deadlock or serialization failure is run again.
_RETRIES = 5

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
_SETTABLE_TYPES = {
    "started_at": "float8",
    "finished_at": "float8",
    "provider_ref": "text",
    "result": "text",
    "error_code": "text",
    "error_message": "text",
    "lease_owner": "text",
    "lease_expires": "float8",
    "actual_cost_micro_usd": "int8",
    "actual_qpu_seconds": "float8",
    "approved_by": "text",
    "cancelled_by": "text",
    "submitted_at": "float8",
    "queued_at": "float8",
}
# Each settable column takes a (set it?, value) pair of parameters, in _SETTABLE order.
_TRANSITION_SET = (  # composed of this module's constants only
    "UPDATE jobs SET state = %s, version = version + 1, updated_at = %s::float8, "  # noqa: S608
    + ", ".join(f"{c} = CASE WHEN %s::bool THEN %s::{_SETTABLE_TYPES[c]} ELSE {c} END" for c in _SETTABLE)
)
_TRANSITION_WHERE = (
    " WHERE id = %s AND state = ANY(%s::text[]) AND (%s::text IS NULL OR lease_owner = %s::text) RETURNING *"
)
_TRANSITION = _TRANSITION_SET + _TRANSITION_WHERE
# A terminal transition settles the job's reservation in the same UPDATE: committed at the job's
# actual cost and QPU time (this move's where it sets them, else the row's; the reservation's
# where there are none), or released. The right-hand sides read the row as it was. Parameters,
# between the transition's columns and its WHERE: paid; paid, (sets the cost?, cost); paid,
# (sets QPU time?, its milliseconds); now.
_SETTLE = """, ledger_status = CASE WHEN ledger_status = 'reserved' THEN
        CASE WHEN %s::bool THEN 'committed' ELSE 'released' END ELSE ledger_status END,
    ledger_micro_usd = CASE WHEN ledger_status = 'reserved' AND %s::bool
        THEN coalesce(CASE WHEN %s::bool THEN %s::int8 ELSE actual_cost_micro_usd END, ledger_micro_usd)
        ELSE ledger_micro_usd END,
    ledger_qpu_millis = CASE WHEN ledger_status = 'reserved' AND %s::bool
        THEN coalesce(CASE WHEN %s::bool THEN %s::int8 ELSE ceil(actual_qpu_seconds * 1000)::int8 END,
                      ledger_qpu_millis)
        ELSE ledger_qpu_millis END,
    settled_at = CASE WHEN ledger_status = 'reserved' THEN %s::float8 ELSE settled_at END"""
_TRANSITION_SETTLE = _TRANSITION_SET + _SETTLE + _TRANSITION_WHERE
# Parameters: day x3, month x3, who.
_TOTALS = """
SELECT ledger_status AS status,
    coalesce(sum(CASE WHEN ledger_day = %s THEN ledger_micro_usd END), 0)::int8 AS d_cost,
    coalesce(sum(CASE WHEN ledger_day = %s THEN ledger_shots END), 0)::int8 AS d_shots,
    coalesce(sum(CASE WHEN ledger_day = %s THEN ledger_qpu_millis END), 0)::int8 AS d_qpu,
    coalesce(sum(CASE WHEN ledger_month = %s THEN ledger_micro_usd END), 0)::int8 AS m_cost,
    coalesce(sum(CASE WHEN ledger_month = %s THEN ledger_shots END), 0)::int8 AS m_shots,
    coalesce(sum(CASE WHEN ledger_month = %s THEN ledger_qpu_millis END), 0)::int8 AS m_qpu,
    coalesce(sum(ledger_micro_usd), 0)::int8 AS t_cost, coalesce(sum(ledger_shots), 0)::int8 AS t_shots,
    coalesce(sum(ledger_qpu_millis), 0)::int8 AS t_qpu
FROM jobs WHERE {column} = %s AND ledger_status IN ('reserved', 'committed') GROUP BY ledger_status
"""
_TOTALS_BY = {"agent": _TOTALS.replace("{column}", "agent"), "project": _TOTALS.replace("{column}", "project")}
_COUNTS = (
    "SELECT count(*) FILTER (WHERE state IN ('queued', 'pending_approval')) AS waiting, "
    "count(*) FILTER (WHERE state IN ('submitting', 'running')) AS running FROM jobs WHERE {column} = %s "
    "AND state IN ('queued', 'pending_approval', 'submitting', 'running')"
)
_COUNTS_BY = {"agent": _COUNTS.replace("{column}", "agent"), "project": _COUNTS.replace("{column}", "project")}
_ACTIVE = (
    "SELECT {column} AS name, count(*) FILTER (WHERE state IN ('queued', 'pending_approval')) AS waiting, "
    "count(*) FILTER (WHERE state IN ('submitting', 'running')) AS running "
    "FROM jobs WHERE state IN ('queued', 'pending_approval', 'submitting', 'running') GROUP BY {column}"
)
# Jobs not yet ended by state and backend, with the oldest one's time (an index range on state).
_LIVE_JOBS = (
    "SELECT state, backend, count(*) AS jobs, min(CASE WHEN state = 'queued' THEN coalesce(queued_at, created_at) "
    "ELSE created_at END) AS oldest_at FROM jobs "
    "WHERE state IN ('pending_approval', 'queued', 'submitting', 'running') GROUP BY state, backend"
)
_ACTIVE_BY = {"agent": _ACTIVE.replace("{column}", "agent"), "backend": _ACTIVE.replace("{column}", "backend")}
# As SQLite's claim: a queued job once its not_before has passed, a leased one once its lease has
# lapsed; a paused agent's or backend's job only once it is at its provider. Parameters: now, now,
# providers, busy backends, agents held back. Rows another claimer holds are skipped, not waited for.
_CLAIMABLE = """
((j.state = 'queued' AND coalesce(j.not_before, 0) <= %s::float8)
  OR (j.state IN ('submitting', 'running') AND j.lease_expires < %s::float8))
AND split_part(j.backend, '/', 1) = ANY(%s::text[])
AND NOT (j.backend = ANY(%s::text[]))
AND (j.provider_ref IS NOT NULL OR NOT EXISTS (
    SELECT 1 FROM pauses p
    WHERE (p.kind = 'agent' AND p.name = j.agent) OR (p.kind = 'backend' AND p.name = j.backend)))
"""
_CLAIM_CANDIDATES = (
    "SELECT j.seq, j.id, j.state, j.agent, j.project, j.runs "
    "FROM jobs j LEFT JOIN agent_turns t ON t.agent = j.agent WHERE "
    + _CLAIMABLE
    + " AND (j.state != 'queued' OR NOT (j.agent = ANY(%s::text[]))) "
    "ORDER BY j.state != 'queued' DESC, j.priority DESC, coalesce(t.last_claimed_at, 0), j.seq "
    "LIMIT %s FOR UPDATE OF j SKIP LOCKED"
)
_ANY_CLAIMABLE = "SELECT 1 FROM jobs j WHERE " + _CLAIMABLE + " LIMIT 1"  # noqa: S608
_CLAIM_ONE = """
UPDATE jobs SET
    state = CASE WHEN state = 'queued' THEN 'submitting' ELSE state END,
    lease_owner = %s, lease_expires = %s::float8, version = version + 1, updated_at = %s::float8,
    runs = runs + 1, started_at = coalesce(started_at, %s::float8),
    attempts = attempts + (provider_ref IS NULL)::int,
    error_code = NULL, error_message = NULL
WHERE seq = %s
  AND ((state = 'queued' AND coalesce(not_before, 0) <= %s::float8)
       OR (state IN ('submitting', 'running') AND lease_expires < %s::float8))
RETURNING *
"""
# The running jobs of a candidate's agent and project, for a running cap to judge it by.
_CANDIDATE_WITH_COUNTS = (
    "SELECT "
    "(SELECT count(*) FROM jobs a WHERE a.agent = j.agent AND a.state IN ('submitting', 'running')) AS _agent_running, "
    "(SELECT count(*) FROM jobs p WHERE p.project = j.project AND p.state IN ('submitting', 'running')) "
    "AS _project_running FROM jobs j WHERE j.seq = %s"
)
_LOCK = "SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s))"
# The claim of one candidate, its agent's turn and its `job.claimed` audit row, in one statement: the
# row was locked by the candidates' read, so what the audit row says (its run) is known before.
_CLAIM = (  # composed of this module's constants only, as the others here
    "WITH c AS (" + _CLAIM_ONE + "), t AS (INSERT INTO agent_turns (agent, last_claimed_at) "  # noqa: S608
    "SELECT agent, %s::float8 FROM c ON CONFLICT (agent) DO UPDATE SET last_claimed_at = excluded.last_claimed_at), "
)


def _locks(function: str, count: int) -> str:
    """One statement taking `count` advisory locks, left to right (a select list's order)."""
    return "SELECT " + ", ".join(f"{function}(%s::int4, hashtext(%s)) AS l{i}" for i in range(count))


_INSERT_JOB = (
    "INSERT INTO jobs (id, agent, project, key_id, name, backend, shots, circuits, n_circuits, "
    "qubits, depth, two_qubit_gates, fingerprint, estimate_micro_usd, state, created_at, updated_at, "
    "priority, idempotency_key, payload_hash, dry_run_of, simulator, pricing_known, "
    "qpu_seconds_estimate, approval_level, approval_expires_at, approved_by, "
    "queued_at, trace_parent, "
    "ledger_status, ledger_day, ledger_month, ledger_micro_usd, ledger_shots, ledger_qpu_millis) "
    "VALUES (%s, %s, %s, %s, %s::text, %s, %s::int8, %s, %s::int8, %s::int8, %s::int8, %s::int8, %s, %s::int8, "
    "%s, %s::float8, %s::float8, %s::int8, %s::text, %s::text, %s::text, %s::bool, %s::bool, %s::float8, "
    "%s::text, %s::float8, %s::text, %s::float8, %s::text, 'reserved', %s, %s, %s::int8, %s::int8, %s::int8) "
    "RETURNING *"
)
# Admission's locks, project before agent (the order every admission takes them in: no deadlock),
# in one statement; its select list is evaluated left to right.
_ADMISSION_LOCKS = "SELECT pg_advisory_xact_lock(%s::int4, hashtext(%s)), pg_advisory_xact_lock(%s::int4, hashtext(%s))"
# Every fact admission decides on, in one row: loop-guard repeats, the agent's and the backend's
# pauses, and the agent's and the project's ledger sums by status and active job counts.
_ADMISSION_FACTS = (
    "SELECT (SELECT count(*) FROM jobs WHERE agent = %s AND backend = %s AND fingerprint = %s "  # noqa: S608
    "AND created_at > %s::float8) AS repeats, "
    "(SELECT coalesce(json_agg(p), '[]') FROM (SELECT kind, name, reason, paused_by, paused_at FROM pauses "
    "WHERE (kind = 'agent' AND name = %s) OR (kind = 'backend' AND name = %s)) AS p) AS pauses, "
    "(SELECT coalesce(json_agg(s), '[]') FROM (" + _TOTALS_BY["agent"] + ") AS s) AS agent_sums, "
    "(SELECT row_to_json(c) FROM (" + _COUNTS_BY["agent"] + ") AS c) AS agent_counts, "
    "(SELECT coalesce(json_agg(s), '[]') FROM (" + _TOTALS_BY["project"] + ") AS s) AS project_sums, "
    "(SELECT row_to_json(c) FROM (" + _COUNTS_BY["project"] + ") AS c) AS project_counts"
)
_KEYS = (
    "SELECT k.*, p.reason AS pause_reason, p.paused_by, p.paused_at FROM keys k "
    "LEFT JOIN pauses p ON p.kind = 'agent' AND p.name = k.agent"
)
_PAUSE = "SELECT kind, name, reason, paused_by, paused_at FROM pauses WHERE kind = %s AND name = %s"
_OPERATOR = "SELECT name, role, password_hash, created_at, disabled_at FROM operators"
# The outbox (migration 0010). A claimed row's next_attempt_at is its lease's end: a claimer that dies
# leaves the row due again then, and another replica takes it (at least once, never lost).
_INSERT_NOTIFICATION = (
    "INSERT INTO notifications (hook, event, dedup_key, agent, project, job_id, body, created_at, next_attempt_at) "
    "VALUES (%s, %s, %s::text, %s::text, %s::text, %s::text, %s, %s::float8, %s::float8) "
    "ON CONFLICT (dedup_key) DO NOTHING"
)
_CLAIM_NOTIFICATIONS = (
    "UPDATE notifications SET lease_owner = %s, next_attempt_at = %s::float8, attempts = attempts + 1 WHERE id IN "
    "(SELECT id FROM notifications WHERE status = 'pending' AND next_attempt_at <= %s::float8 "
    "ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING *"
)
_FINISH_NOTIFICATION = (
    "UPDATE notifications SET status = %s::text, next_attempt_at = %s::float8, last_error = %s::text, "
    "lease_owner = NULL, finished_at = CASE WHEN %s::text = 'pending' THEN NULL ELSE %s::float8 END "
    "WHERE id = %s AND lease_owner = %s AND status = 'pending'"
)
_RELEASE_NOTIFICATIONS = (
    "UPDATE notifications SET lease_owner = NULL, next_attempt_at = %s::float8, "
    "attempts = greatest(attempts - 1, 0) WHERE lease_owner = %s AND status = 'pending' RETURNING id"
)
_NOTIFICATIONS = "SELECT * FROM notifications WHERE (%s::text IS NULL OR status = %s::text) ORDER BY id DESC LIMIT %s"
_BY_IDEMPOTENCY_KEY = "SELECT * FROM jobs WHERE agent = %s AND idempotency_key = %s"
_NO_CURSOR = 2**62
_LIST_JOBS = {
    (True, True): "SELECT * FROM jobs WHERE agent = %s AND state = %s AND seq < %s ORDER BY seq DESC LIMIT %s",
    (True, False): "SELECT * FROM jobs WHERE agent = %s AND seq < %s ORDER BY seq DESC LIMIT %s",
    (False, True): "SELECT * FROM jobs WHERE state = %s AND seq < %s ORDER BY seq DESC LIMIT %s",
    (False, False): "SELECT * FROM jobs WHERE seq < %s ORDER BY seq DESC LIMIT %s",
}
# One audit row in one statement (migration 0007): the head's UPDATE locks it to this transaction's
# end (appends from every replica queue there), takes the next seq, and hashes the row on the server
# as `chain_hash` does, sha256(prev_hash || canonical JSON), from the JSON's two parts around its
# seq; the INSERT stores the row with both hashes. Parameters: GENESIS twice, the JSON's parts.
# `{when}` may make the append depend on another part of the same statement (a claim that matched).
_AUDIT_HEAD_CTE = (
    "h AS (UPDATE audit_head SET prev_hash = coalesce(nullif(row_hash, ''), %s), seq = seq + 1, "
    "row_hash = encode(sha256(convert_to(coalesce(nullif(row_hash, ''), %s) || %s || (seq + 1)::text || %s, "
    "'UTF8')), 'hex'){when} RETURNING seq, prev_hash, row_hash)"
)
_AUDIT_ROW = (
    "INSERT INTO audit (seq, at, agent, project, key_id, tool, decision, error_code, args_hash, job_id, detail, "
    "operator, prev_hash, row_hash) SELECT h.seq, %s::float8, %s::text, %s::text, %s::text, %s, %s, %s::text, "
    "%s::text, %s::text, %s::text, %s::text, h.prev_hash, h.row_hash FROM h"
)
_APPEND = "WITH " + _AUDIT_HEAD_CTE.replace("{when}", "") + " " + _AUDIT_ROW
# A seq no row has, stood in for while the row's JSON is cut around its place.
_SEQ_MARK = 7_346_019_582_113_904_457
# The admitted job with its reservation, and its audit row, in one statement.
_ADMIT = " ".join(  # composed of this module's constants only
    (
        "WITH j AS (",
        _INSERT_JOB,
        "),",
        _AUDIT_HEAD_CTE.replace("{when}", ""),
        ", a AS (",
        _AUDIT_ROW,
        ") SELECT * FROM j",
    )
)
_CLAIM += " ".join(  # the audit row only if the claim matched
    (_AUDIT_HEAD_CTE.replace("{when}", " WHERE EXISTS (SELECT 1 FROM c)"), ", a AS (", _AUDIT_ROW, ") SELECT * FROM c")
)
# A lease holder's move and its audit row in one statement, committed by itself (`transition` with
# the job as the caller holds it): as `_APPEND`, the row hashed on the server, but its error code is
# the one the move leaves on the job (the audit entry's, else the row's), so the JSON comes in three
# parts around that code and the seq. Parameters: the move's (ending in its WHERE), GENESIS twice,
# the JSON's first part, the entry's error code, the second and third parts, then the audit row's
# (`_AUDIT_ROW`'s, with the entry's error code standing for the row's).
_MOVED_AUDIT = (
    "h AS (UPDATE audit_head SET prev_hash = coalesce(nullif(audit_head.row_hash, ''), %s), seq = audit_head.seq + 1, "
    "row_hash = encode(sha256(convert_to(coalesce(nullif(audit_head.row_hash, ''), %s) || %s || "
    "coalesce(to_json(coalesce(%s::text, j.error_code))::text, 'null') || %s || (audit_head.seq + 1)::text || %s, "
    "'UTF8')), 'hex') FROM j RETURNING audit_head.seq, audit_head.prev_hash, audit_head.row_hash), "
    "a AS (INSERT INTO audit (seq, at, agent, project, key_id, tool, decision, error_code, args_hash, job_id, detail, "
    "operator, prev_hash, row_hash) SELECT h.seq, %s::float8, %s::text, %s::text, %s::text, %s, %s, "
    "coalesce(%s::text, j.error_code), %s::text, %s::text, %s::text, %s::text, h.prev_hash, h.row_hash FROM h, j) "
    "SELECT * FROM j"
)
_TRANSITION_AUDITED = "WITH j AS (" + _TRANSITION + "), " + _MOVED_AUDIT
_TRANSITION_SETTLE_AUDITED = "WITH j AS (" + _TRANSITION_SETTLE + "), " + _MOVED_AUDIT
# A string no error code is, stood in for while the row's JSON is cut around the code's place.
_CODE_MARK = "qpu-gateway-error-code-7346019582"
# What an error code may hold: the server quotes it for the row's hash as Python's json does, which
# is exact for these characters (and the gateway's codes are all such names).
_ERROR_CODE = re.compile(r"\A[a-z0-9_.:-]*\Z")
_AUDIT_COLUMNS = (
    "seq, at, agent, project, key_id, tool, decision, error_code, args_hash, job_id, detail, prev_hash, row_hash, "
    "operator"
)
ENV_CONNECT_TIMEOUT = "QPU_GATEWAY_BUSY_TIMEOUT_S"  # the same knob as SQLite's busy timeout
DEFAULT_CONNECT_TIMEOUT_S = 5.0


def connect_timeout_s() -> float:
    """How long a call waits for a database connection before it is answered `unavailable`."""
    return min(float(os.environ.get(ENV_CONNECT_TIMEOUT) or DEFAULT_CONNECT_TIMEOUT_S), DEFAULT_CONNECT_TIMEOUT_S)


@observer.operations()
class PostgresStore:
    def __init__(self, connector: Connector, installation: str) -> None:
        self._db = connector
        self._installation = installation
        # A job was queued through this store since the last claim: the claim then skips its first
        # read of whether anything is claimable (as SQLite's does).
        self._queued_here = False
        # Job versions written through this store whose writer announces them in this process: an
        # admission (which also wakes this process's workers), a claim, a lease owner's transition.
        # Their notifications are not passed back to this process (see `watch_changes`), so a worker
        # is not woken again for a job it is claiming, nor a waiter made to read a job it is about
        # to be handed. Insertion-ordered, the oldest forgotten first.
        self._own: dict[tuple[str, int], None] = {}

    @classmethod
    async def open(cls, url: str, connector: Connector | None = None) -> PostgresStore:
        """Connect (psycopg unless a connector is given); the schema is not touched until `migrate`."""
        if connector is None:
            from qpu_gateway.store import pg_psycopg

            psycopg_connector = pg_psycopg.connect(url, connect_timeout_s=connect_timeout_s())
            await psycopg_connector.open()
            connector = psycopg_connector
        return cls(connector, "")

    async def close(self) -> None:
        await self._db.close()

    # -- running transactions ---------------------------------------------------------------

    async def _read(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        async with self._db.reading() as tx:
            return await work(tx)

    async def _alone(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """One write statement on its own (committed by itself): a lease extended, a key's last use."""
        async with self._db.reading() as tx:
            return await work(tx)

    async def _write(self, work: Callable[[Tx], Awaitable[T]]) -> T:
        """Run `work` in one transaction: all of it or none, again if the server aborted it as a deadlock."""

        async def once() -> T:
            async with self._db.transaction() as tx:
                return await work(tx)

        return await _retrying(once, "transaction")

    # -- migrations -------------------------------------------------------------------------

    async def migrate(self) -> list[str]:
        scripts = sorted(
            (entry.name, entry.read_text(encoding="utf-8"))
            for entry in resources.files("qpu_gateway.store.migrations.postgres").iterdir()
            if entry.name.endswith(".sql")
        )

        async def work(tx: Tx) -> list[str]:
            # Processes starting together on a new database: one applies, the others wait and see it done.
            await tx.one(_LOCK, (_LOCK_MIGRATIONS, "migrations"))
            await tx.run(
                "CREATE TABLE IF NOT EXISTS schema_migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION "
                "NOT NULL)"
            )
            done = {row["name"] for row in await tx.all("SELECT name FROM schema_migrations")}
            applied: list[str] = []
            for name, script in scripts:
                if name in done:
                    continue
                await tx.script(script)
                await tx.run(
                    "INSERT INTO schema_migrations (name, applied_at) VALUES (%s, %s::float8)", (name, time.time())
                )
                applied.append(name)
            return applied

        # DDL is transactional in PostgreSQL: a migration that fails leaves nothing half-applied.
        async with self._db.scripting() as tx:
            applied = await work(tx)
        await self._load_installation()
        return applied

    async def _load_installation(self) -> None:
        row = await self._read(lambda tx: tx.one("SELECT id FROM installation LIMIT 1"))
        self._installation = str(row["id"]) if row is not None else ""

    async def _write_announced(self, work: Callable[[Tx, Callable[[JobRecord], None]], Awaitable[T]]) -> T:
        """`_write`, where `work` notes each job version it writes that its caller announces here.

        Noted before the commit (a notification can arrive before the commit's answer does), and
        forgotten again if the transaction fails, so a version this store never wrote is never
        kept from this process.
        """
        noted: list[tuple[str, int]] = []

        def note(job: JobRecord) -> None:
            key = (job.id, job.version)
            noted.append(key)
            self._own[key] = None
            if len(self._own) > _OWN_KEPT:  # notifications that never came (a listener reconnecting)
                del self._own[next(iter(self._own))]

        try:
            return await self._write(lambda tx: work(tx, note))
        except BaseException:
            for key in noted:
                self._own.pop(key, None)
            raise

    async def _alone_announced(
        self, expected: tuple[str, int], work: Callable[[Tx], Awaitable[Row | None]]
    ) -> Row | None:
        """One write statement committed by itself, whose job change (`expected`: the job and the version
        it should get) its caller announces here: noted before it is sent (its notification can arrive
        before its answer), forgotten if it fails or wrote another version. Again if aborted as a deadlock."""
        self._own[expected] = None
        try:
            row = await _retrying(lambda: self._alone(work), "statement")
        except BaseException:
            self._own.pop(expected, None)
            raise
        if row is None or int(row["version"]) != expected[1]:
            self._own.pop(expected, None)
        return row

    def rate_namespace(self) -> str:
        return f"qpu:{self._installation}" if self._installation else "qpu"

    # -- job changes ------------------------------------------------------------------------

    async def watch_changes(
        self, on_change: Callable[[JobChange], Awaitable[None]], on_connected: Callable[[], Awaitable[None]]
    ) -> bool:
        async def notified(payload: str) -> None:
            job_id, version, state = payload.split(" ")
            if (job_id, int(version)) in self._own:
                del self._own[(job_id, int(version))]
                return  # written here by a caller that announces it here
            await on_change(JobChange(job_id, int(version), JobState(state)))

        await self._db.listen(CHANNEL, notified, on_connected)
        return True

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

        async def work(tx: Tx) -> None:
            await tx.run(
                "INSERT INTO keys (id, secret_hash, agent, project, scopes, created_at, expires_at) "
                "VALUES (%s, %s, %s, %s, %s, %s::float8, %s::float8)",
                params,
            )
            if audit is not None:
                await _append(tx, audit, key.created_at)

        await self._write(work)

    async def key_by_id(self, key_id: str) -> KeyRecord | None:
        row = await self._read(lambda tx: tx.one(_KEYS + " WHERE k.id = %s", (key_id,)))
        return _key(row) if row is not None else None

    async def list_keys(self) -> list[KeyRecord]:
        rows = await self._read(lambda tx: tx.all(_KEYS + " ORDER BY k.created_at, k.id"))
        return [_key(row) for row in rows]

    async def _change_key(self, sql: str, params: Sequence[Any], audit: AuditEntry | None, now: float) -> bool:
        async def work(tx: Tx) -> bool:
            changed = await tx.all(sql + " RETURNING id", params)
            if changed and audit is not None:
                await _append(tx, audit, now)
            return bool(changed)

        return await self._write(work)

    async def revoke_key(self, key_id: str, now: float, audit: AuditEntry | None = None) -> bool:
        return await self._change_key(
            "UPDATE keys SET revoked_at = %s::float8 WHERE id = %s AND revoked_at IS NULL", (now, key_id), audit, now
        )

    async def rotate_key(self, key_id: str, secret_hash: str, audit: AuditEntry | None = None) -> bool:
        return await self._change_key(
            "UPDATE keys SET secret_hash = %s WHERE id = %s AND revoked_at IS NULL",
            (secret_hash, key_id),
            audit,
            time.time(),
        )

    async def touch_key(self, key_id: str, now: float) -> None:
        await self._alone(lambda tx: tx.run("UPDATE keys SET last_used_at = %s::float8 WHERE id = %s", (now, key_id)))

    async def key_count(self) -> int:
        row = await self._read(lambda tx: tx.one("SELECT count(*) AS n FROM keys"))
        assert row is not None
        return int(row["n"])

    # -- pauses -----------------------------------------------------------------------------

    async def pause(self, pause: Pause, audit: AuditEntry) -> Pause | None:
        async def work(tx: Tx) -> Pause | None:
            inserted = await tx.all(
                "INSERT INTO pauses (kind, name, reason, paused_by, paused_at) "
                "VALUES (%s, %s, %s::text, %s, %s::float8) ON CONFLICT (kind, name) DO NOTHING RETURNING kind",
                (pause.kind, pause.name, pause.reason, pause.paused_by, pause.paused_at),
            )
            if not inserted:
                earlier = await tx.one(_PAUSE, (pause.kind, pause.name))
                return _pause(earlier) if earlier is not None else pause
            await _append(tx, audit, pause.paused_at)
            return None

        return await self._write(work)

    async def resume(self, kind: str, name: str, now: float, audit: AuditEntry) -> Pause | None:
        async def work(tx: Tx) -> Pause | None:
            row = await tx.one(
                "DELETE FROM pauses WHERE kind = %s AND name = %s RETURNING kind, name, reason, paused_by, paused_at",
                (kind, name),
            )
            if row is None:
                return None
            await _append(tx, audit, now)
            return _pause(row)

        return await self._write(work)

    async def pauses(self, kind: str | None = None) -> list[Pause]:
        rows = await self._read(
            lambda tx: tx.all(
                "SELECT kind, name, reason, paused_by, paused_at FROM pauses WHERE %s::text IS NULL OR kind = %s::text "
                "ORDER BY kind, paused_at",
                (kind, kind),
            )
        )
        return [_pause(row) for row in rows]

    async def pause_of(self, kind: str, name: str) -> Pause | None:
        row = await self._read(lambda tx: tx.one(_PAUSE, (kind, name)))
        return _pause(row) if row is not None else None

    # -- the console's operators and sessions -----------------------------------------------

    async def insert_operator(self, operator: OperatorRecord, audit: AuditEntry) -> bool:
        async def work(tx: Tx) -> bool:
            inserted = await tx.all(
                "INSERT INTO operators (name, role, password_hash, created_at) VALUES (%s, %s, %s, %s::float8) "
                "ON CONFLICT (name) DO NOTHING RETURNING name",
                (operator.name, operator.role, operator.password_hash, operator.created_at),
            )
            if inserted:
                await _append(tx, audit, operator.created_at)
            return bool(inserted)

        return await self._write(work)

    async def operator(self, name: str) -> OperatorRecord | None:
        row = await self._read(lambda tx: tx.one(_OPERATOR + " WHERE name = %s", (name,)))
        return _operator(row) if row is not None else None

    async def list_operators(self) -> list[OperatorRecord]:
        return [_operator(row) for row in await self._read(lambda tx: tx.all(_OPERATOR + " ORDER BY name"))]

    async def disable_operator(self, name: str, now: float, audit: AuditEntry) -> bool:
        async def work(tx: Tx) -> bool:
            changed = await tx.all(
                "UPDATE operators SET disabled_at = %s::float8 WHERE name = %s AND disabled_at IS NULL RETURNING name",
                (now, name),
            )
            if not changed:
                return False
            await tx.run("DELETE FROM operator_sessions WHERE operator = %s", (name,))
            await _append(tx, audit, now)
            return True

        return await self._write(work)

    async def start_session(self, session: SessionRecord, idle_before: float) -> None:
        async def work(tx: Tx) -> None:
            await tx.run("DELETE FROM operator_sessions WHERE seen_at < %s::float8", (idle_before,))
            await tx.run(
                "INSERT INTO operator_sessions (id_hash, operator, created_at, seen_at) "
                "VALUES (%s, %s, %s::float8, %s::float8)",
                (session.id_hash, session.operator, session.created_at, session.seen_at),
            )

        await self._write(work)

    async def session(self, id_hash: str) -> tuple[SessionRecord, OperatorRecord] | None:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT s.id_hash, s.operator, s.created_at AS session_created_at, s.seen_at, o.name, o.role, "
                "o.password_hash, o.created_at, o.disabled_at FROM operator_sessions s "
                "JOIN operators o ON o.name = s.operator WHERE s.id_hash = %s",
                (id_hash,),
            )
        )
        if row is None:
            return None
        session = SessionRecord(
            str(row["id_hash"]), str(row["operator"]), float(row["session_created_at"]), float(row["seen_at"])
        )
        return session, _operator(row)

    async def touch_session(self, id_hash: str, now: float) -> None:
        await self._alone(
            lambda tx: tx.run("UPDATE operator_sessions SET seen_at = %s::float8 WHERE id_hash = %s", (now, id_hash))
        )

    async def end_session(self, id_hash: str) -> None:
        await self._alone(lambda tx: tx.run("DELETE FROM operator_sessions WHERE id_hash = %s", (id_hash,)))

    # -- processes sharing the database ------------------------------------------------------

    async def report_process(self, report: ProcessReport) -> None:
        await self._alone(
            lambda tx: tx.run(
                "INSERT INTO processes (id, host, pid, serving, started_at, seen_at, policy_path, policy_sha256, "
                "overrides_sha256, policy_error) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, serving = EXCLUDED.serving, "
                "started_at = EXCLUDED.started_at, seen_at = EXCLUDED.seen_at, policy_path = EXCLUDED.policy_path, "
                "policy_sha256 = EXCLUDED.policy_sha256, overrides_sha256 = EXCLUDED.overrides_sha256, "
                "policy_error = EXCLUDED.policy_error",
                dataclasses.astuple(report),
            )
        )

    async def forget_process(self, process_id: str) -> None:
        await self._alone(lambda tx: tx.run("DELETE FROM processes WHERE id = %s", (process_id,)))

    async def processes(self, seen_after: float) -> list[ProcessReport]:
        rows = await self._read(
            lambda tx: tx.all(
                "SELECT id, host, pid, serving, started_at, seen_at, policy_path, policy_sha256, overrides_sha256, "
                "policy_error FROM processes WHERE seen_at > %s ORDER BY started_at, id",
                (seen_after,),
            )
        )
        return [ProcessReport(**row) for row in rows]

    async def publish_metrics(self, owner: str, samples: str, now: float) -> None:
        await self._alone(
            lambda tx: tx.run(
                "INSERT INTO metric_snapshots (owner, updated_at, samples) VALUES (%s, %s, %s) "
                "ON CONFLICT (owner) DO UPDATE SET updated_at = EXCLUDED.updated_at, samples = EXCLUDED.samples",
                (owner, now, samples),
            )
        )

    async def metric_snapshots(self) -> list[MetricSnapshot]:
        rows = await self._read(
            lambda tx: tx.all("SELECT owner, updated_at, samples FROM metric_snapshots ORDER BY owner")
        )
        return [MetricSnapshot(str(r["owner"]), float(r["updated_at"]), str(r["samples"])) for r in rows]

    async def retire_metrics(
        self, stale_before: float, keep: Collection[str], merge: Callable[[list[str]], str], now: float
    ) -> int:
        async def work(tx: Tx) -> int:
            # The retired row, made first and locked, serialises two processes retiring at once.
            await tx.run(
                "INSERT INTO metric_snapshots (owner, updated_at, samples) VALUES (%s, %s, '{}') "
                "ON CONFLICT (owner) DO NOTHING",
                (RETIRED_METRICS, now),
            )
            kept = await tx.one("SELECT samples FROM metric_snapshots WHERE owner = %s FOR UPDATE", (RETIRED_METRICS,))
            stale = await tx.all(
                "SELECT owner, samples FROM metric_snapshots WHERE updated_at < %s AND owner != %s "
                "AND NOT (owner = ANY(%s::text[])) FOR UPDATE",
                (stale_before, RETIRED_METRICS, sorted(keep)),
            )
            if not stale:
                return 0
            merged = merge(([str(kept["samples"])] if kept else []) + [str(row["samples"]) for row in stale])
            await tx.run(
                "UPDATE metric_snapshots SET updated_at = %s, samples = %s WHERE owner = %s",
                (now, merged, RETIRED_METRICS),
            )
            await tx.run(
                "DELETE FROM metric_snapshots WHERE owner = ANY(%s::text[])", ([str(row["owner"]) for row in stale],)
            )
            return len(stale)

        return await self._write(work)

    async def shared_secret(self, name: str, candidate: bytes) -> bytes:
        async def work(tx: Tx) -> bytes:
            # The first writer's value wins; a loser's INSERT does nothing and the SELECT reads the winner's.
            await tx.run(
                "INSERT INTO shared_secrets (name, value, created_at) VALUES (%s, %s, %s) "
                "ON CONFLICT (name) DO NOTHING",
                (name, candidate, time.time()),
            )
            row = await tx.one("SELECT value FROM shared_secrets WHERE name = %s", (name,))
            assert row is not None
            return bytes(row["value"])

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
        facts: list[Statement] = [
            (
                _ADMISSION_FACTS,
                (
                    job.agent,
                    job.backend,
                    job.fingerprint,
                    now - loop_window_s,
                    job.agent,
                    job.backend,
                    *_totals_params(job.agent, day, month),
                    job.agent,
                    *_totals_params(job.project, day, month),
                    job.project,
                ),
            )
        ]
        if job.idempotency_key is not None:
            facts.append((_BY_IDEMPOTENCY_KEY, (job.agent, job.idempotency_key)))

        async def work(tx: Tx, note: Callable[[JobRecord], None]) -> tuple[JobRecord, bool] | Refusal:
            # One round trip with a pipelining driver: both locks, then every fact, read under them
            # (a statement's snapshot is taken when it starts, after the locks' statement has ended).
            await tx.run(_ADMISSION_LOCKS, (_LOCK_PROJECT, job.project, _LOCK_AGENT, job.agent))
            results = await tx.many(facts)
            if job.idempotency_key is not None and results[-1]:
                return _job(results[-1][0]), False
            read = results[0][0]
            paused = {row["kind"]: _pause(row) for row in _json(read["pauses"])}
            decision = AdmissionFacts(
                agent=_totals(_json(read["agent_sums"]), _json(read["agent_counts"])),
                project=_totals(_json(read["project_sums"]), _json(read["project_counts"])),
                repeats=int(read["repeats"]),
                agent_pause=paused.get("agent"),
                backend_pause=paused.get("backend"),
            )
            refusal = decide(decision)
            if refusal is not None:
                return refusal
            # Outbox rows before the audit row, which locks the chain's head: a row waiting on another
            # transaction's same dedup key must not hold the head meanwhile. Sent without waiting.
            for outgoing in notify(decision) if notify is not None else ():
                await tx.run(_INSERT_NOTIFICATION, _notification_params(outgoing, now))
            # The job, its reservation and its audit row: one statement.
            row = await tx.one(
                _ADMIT, (*_job_params(job, now), *reservation(job, day, month), *_audit_params(audit, now))
            )
            assert row is not None
            stored = _job(row)
            note(stored)  # admission announces it here, and wakes this process's workers
            return stored, True

        admitted = await self._write_announced(work)
        if isinstance(admitted, tuple) and admitted[1]:
            self._queued_here = self._queued_here or admitted[0].state is JobState.QUEUED
        return admitted

    async def ledger_totals(self, column: Literal["agent", "project"], who: str, now: float) -> LedgerTotals:
        day, month = ledger_periods(now)

        async def work(tx: Tx) -> LedgerTotals:
            sums, counts = await tx.many(_totals_statements(column, who, day, month))
            return _totals(sums, counts[0])

        return await self._read(work)

    async def job_by_idempotency_key(self, agent: str, key: str) -> JobRecord | None:
        row = await self._read(lambda tx: tx.one(_BY_IDEMPOTENCY_KEY, (agent, key)))
        return _job(row) if row is not None else None

    async def has_simulation(self, project: str, fingerprint: str) -> bool:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT 1 AS one FROM jobs WHERE project = %s AND fingerprint = %s AND state = 'succeeded' "
                "AND simulator LIMIT 1",
                (project, fingerprint),
            )
        )
        return row is not None

    async def pending_approvals(self) -> list[JobRecord]:
        rows = await self._read(lambda tx: tx.all("SELECT * FROM jobs WHERE state = 'pending_approval' ORDER BY seq"))
        return [_job(row) for row in rows]

    async def expired_approvals(self, now: float) -> list[str]:
        rows = await self._read(
            lambda tx: tx.all(
                "SELECT id FROM jobs WHERE state = 'pending_approval' AND approval_expires_at < %s::float8 "
                "ORDER BY seq",
                (now,),
            )
        )
        return [row["id"] for row in rows]

    async def get_job(self, job_id: str) -> JobRecord | None:
        row = await self._read(lambda tx: tx.one("SELECT * FROM jobs WHERE id = %s", (job_id,)))
        return _job(row) if row is not None else None

    async def list_jobs(
        self, *, agent: str | None, state: JobState | None, limit: int, before_seq: int | None
    ) -> list[JobRecord]:
        query = _LIST_JOBS[(agent is not None, state is not None)]
        params: list[object] = [p for p in (agent, state.value if state else None) if p is not None]
        params += [_NO_CURSOR if before_seq is None else before_seq, limit]
        rows = await self._read(lambda tx: tx.all(query, params))
        return [_job(row) for row in rows]

    async def job_ids(self, agent: str, prefix: str, limit: int) -> list[str]:
        rows = await self._read(
            lambda tx: tx.all(
                "SELECT id FROM jobs WHERE agent = %s AND starts_with(id, %s) ORDER BY seq DESC LIMIT %s",
                (agent, prefix, limit),
            )
        )
        return [str(row["id"]) for row in rows]

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
        names = sorted(set(providers))
        skipped = sorted(set(busy_backends))
        if not names or limit < 1:
            return []
        # Read first, so a worker polling an empty queue opens no transaction and locks nothing;
        # not after a job was queued through this store (there is then something to claim).
        queued_here, self._queued_here = self._queued_here, False
        if not queued_here and await self._read(lambda tx: tx.one(_ANY_CLAIMABLE, (now, now, names, skipped))) is None:
            return []

        async def work(tx: Tx, note: Callable[[JobRecord], None]) -> list[JobRecord]:
            claimer = _Claimer(tx, owner, lease_s, now, may_run, names)
            busy = set(skipped)
            taken: dict[str, int] = {}
            jobs: list[JobRecord] = []
            while len(jobs) < limit:
                turn = now + len(jobs) * 1e-6  # agents still take turns within one batch
                job = await claimer.next(sorted(busy), turn, room_for=limit - len(jobs))
                if job is None:
                    break
                jobs.append(job)
                note(job)  # the worker announces every job it claims
                taken[job.backend] = taken.get(job.backend, 0) + 1
                if room is not None and taken[job.backend] >= room(job.backend):
                    busy.add(job.backend)
                if claimer.exhausted:
                    break
            return jobs

        return await self._write_announced(work)

    async def heartbeat(self, job_ids: Iterable[str], owner: str, until: float) -> set[str]:
        ids = list(job_ids)
        if not ids:
            return set()
        rows = await self._alone(
            lambda tx: tx.all(
                "UPDATE jobs SET lease_expires = %s::float8 WHERE lease_owner = %s AND id = ANY(%s::text[]) "
                "AND state IN ('submitting', 'running') RETURNING id",
                (until, owner, ids),
            )
        )
        return {row["id"] for row in rows}

    async def record_attempt(self, job_id: str, owner: str, audit: AuditEntry | None = None) -> None:
        if audit is None:
            await self._alone(
                lambda tx: tx.run(
                    "UPDATE jobs SET attempts = attempts + 1 WHERE id = %s AND lease_owner = %s", (job_id, owner)
                )
            )
            return

        async def work(tx: Tx) -> None:
            row = await tx.one(
                "UPDATE jobs SET attempts = attempts + 1 WHERE id = %s AND lease_owner = %s RETURNING 1 AS moved",
                (job_id, owner),
            )
            if row is not None:  # the row tells of an attempt that happened: not if the job was taken away
                await _append(tx, audit, time.time())

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
        held: JobRecord | None = None,
    ) -> JobRecord | None:
        values = dict(fields or {})
        unknown = set(values) - set(_SETTABLE)
        if unknown:
            raise ValueError(f"transition cannot set {sorted(unknown)}")
        if values.get("result") is not None:
            values["result"] = json.dumps(values["result"])
        pairs = [x for column in _SETTABLE for x in (column in values, values.get(column))]
        allowed = sources_of(new) if from_state is None else sources_of(new) & {from_state}
        sources = sorted(s.value for s in allowed)
        entry = audit or AuditEntry(tool=f"job.{new.value}", decision="event")

        where = (job_id, sources, owner, owner)
        if new in TERMINAL:  # the job and its reservation settled in one statement
            settle = settlement(new is JobState.SUCCEEDED if charge is None else charge, values, now)
            moved: Statement = (_TRANSITION_SETTLE, (new.value, now, *pairs, *settle, *where))
        else:
            moved = (_TRANSITION, (new.value, now, *pairs, *where))

        if owner is not None and held is not None and held.id == job_id:
            # A lease holder's move: who the job belongs to is known (it never changes), so the audit
            # row goes in the same statement, committed by itself.
            code = entry.error_code or None
            if code is not None and not _ERROR_CODE.match(code):
                raise ValueError(f"not an error code: {code!r}")
            statement = _TRANSITION_SETTLE_AUDITED if new in TERMINAL else _TRANSITION_AUDITED
            audited = AuditEntry(
                tool=entry.tool,
                decision=entry.decision,
                agent=entry.agent or held.agent,
                project=entry.project or held.project,
                key_id=entry.key_id,
                error_code=code,
                args_hash=entry.args_hash,
                job_id=job_id,
                detail=entry.detail,
                operator=entry.operator,
            )
            row = await self._alone_announced(
                (job_id, held.version + 1),
                lambda tx: tx.one(statement, (*moved[1], *_moved_audit_params(audited, now))),
            )
            return None if row is None else _job(row)

        async def work(tx: Tx, note: Callable[[JobRecord], None]) -> JobRecord | None:
            row = await tx.one(*moved)
            if row is None:
                return None
            job = _job(row)
            if owner is not None:
                note(job)  # a lease owner (a worker) announces what it moved
            await _append(
                tx,
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

        return await self._write_announced(work)

    async def retry_later(self, job_id: str, owner: str, now: float, *, until: float, message: str) -> JobRecord | None:
        async def work(tx: Tx) -> JobRecord | None:
            row = await tx.one(
                "UPDATE jobs SET state = CASE WHEN provider_ref IS NULL THEN 'queued' ELSE state END, "
                "lease_owner = NULL, lease_expires = CASE WHEN provider_ref IS NULL THEN NULL ELSE %s::float8 END, "
                "not_before = %s::float8, internal_failures = internal_failures + 1, "
                "error_code = 'internal_error', error_message = %s, version = version + 1, updated_at = %s::float8 "
                "WHERE id = %s AND lease_owner = %s AND state IN ('submitting', 'running') RETURNING *",
                (until, until, message, now, job_id, owner),
            )
            if row is None:
                return None
            job = _job(row)
            await _append(
                tx,
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
        async def work(tx: Tx) -> bool:
            if not requeue:
                released = await tx.all(
                    "UPDATE jobs SET lease_owner = NULL, lease_expires = 0 WHERE id = %s AND lease_owner = %s "
                    "RETURNING id",
                    (job_id, owner),
                )
                return bool(released)
            rows = await tx.all(
                "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
                "provider_ref = NULL, version = version + 1, updated_at = %s::float8 "
                "WHERE id = %s AND lease_owner = %s AND state IN ('submitting', 'running') "
                "RETURNING agent, project",
                (now, job_id, owner),
            )
            for row in rows:
                await _append(
                    tx,
                    AuditEntry(
                        tool="job.requeued",
                        decision="event",
                        agent=row["agent"],
                        project=row["project"],
                        job_id=job_id,
                        detail="the provider no longer knows the job; it runs again",
                    ),
                    now,
                )
            return bool(rows)

        return await self._write(work)

    async def hand_back(self, owner: str, now: float) -> int:
        async def work(tx: Tx) -> int:
            requeued, released = await tx.many(
                [
                    (
                        "UPDATE jobs SET state = 'queued', lease_owner = NULL, lease_expires = NULL, "
                        "version = version + 1, updated_at = %s::float8 "
                        "WHERE lease_owner = %s AND state IN ('submitting', 'running') AND provider_ref IS NULL "
                        "RETURNING id, agent, project",
                        (now, owner),
                    ),
                    (
                        "UPDATE jobs SET lease_owner = NULL, lease_expires = 0, version = version + 1, "
                        "updated_at = %s::float8 WHERE lease_owner = %s AND state IN ('submitting', 'running') "
                        "RETURNING id, agent, project",
                        (now, owner),
                    ),
                ]
            )
            for rows, what in ((requeued, "queued again"), (released, "left with the provider, lease released")):
                for row in rows:
                    await _append(
                        tx,
                        AuditEntry(
                            tool="job.handed_back",
                            decision="event",
                            agent=row["agent"],
                            project=row["project"],
                            job_id=row["id"],
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
            lambda tx: tx.all("SELECT id, version, state FROM jobs WHERE id = ANY(%s::text[])", (ids,))
        )
        return {row["id"]: (int(row["version"]), JobState(row["state"])) for row in rows}

    async def live_jobs(self) -> list[LiveJobs]:
        rows = await self._read(lambda tx: tx.all(_LIVE_JOBS))
        return [LiveJobs(JobState(r["state"]), str(r["backend"]), int(r["jobs"]), float(r["oldest_at"])) for r in rows]

    async def active_job_counts(self, column: Literal["agent", "backend"]) -> dict[str, tuple[int, int]]:
        rows = await self._read(lambda tx: tx.all(_ACTIVE_BY[column]))
        return {row["name"]: (int(row["waiting"]), int(row["running"])) for row in rows}

    async def usage_by_state(self, agent: str) -> list[StateUsage]:
        rows = await self._read(
            lambda tx: tx.all(
                "SELECT state, count(*) AS jobs, coalesce(sum(shots * n_circuits), 0)::int8 AS shots FROM jobs "
                "WHERE agent = %s GROUP BY state ORDER BY state",
                (agent,),
            )
        )
        return [StateUsage(JobState(row["state"]), int(row["jobs"]), int(row["shots"])) for row in rows]

    # -- audit ------------------------------------------------------------------------------

    # -- notifications outbox ------------------------------------------------------------

    async def enqueue_notifications(self, rows: Sequence[NewNotification], now: float) -> int:
        if not rows:
            return 0

        async def work(tx: Tx) -> int:
            stored = await tx.many(
                [(_INSERT_NOTIFICATION + " RETURNING id", _notification_params(r, now)) for r in rows]
            )
            return sum(len(ids) for ids in stored)

        return await self._write(work)

    async def claim_notifications(
        self, owner: str, lease_until: float, now: float, limit: int
    ) -> list[NotificationRecord]:
        # SKIP LOCKED: replicas claiming at once take different rows; the UPDATE commits by itself.
        rows = await _retrying(
            lambda: self._alone(lambda tx: tx.all(_CLAIM_NOTIFICATIONS, (owner, lease_until, now, limit))), "statement"
        )
        return sorted((NotificationRecord.from_row(r) for r in rows), key=lambda n: n.id)

    async def finish_notification(
        self, notification_id: int, owner: str, outcome: DeliveryOutcome, now: float, audit: AuditEntry
    ) -> bool:
        params = (outcome.status, outcome.next_attempt_at or now, outcome.error, outcome.status, now)

        async def work(tx: Tx) -> bool:
            changed = await tx.all(_FINISH_NOTIFICATION + " RETURNING id", (*params, notification_id, owner))
            if changed:
                await _append(tx, audit, now)
            return bool(changed)

        return await self._write(work)

    async def release_notifications(self, owner: str, now: float) -> int:
        rows = await self._alone(lambda tx: tx.all(_RELEASE_NOTIFICATIONS, (now, owner)))
        return len(rows)

    async def notifications(self, *, status: str | None = None, limit: int = 100) -> list[NotificationRecord]:
        rows = await self._read(lambda tx: tx.all(_NOTIFICATIONS, (status, status, limit)))
        return [NotificationRecord.from_row(r) for r in rows]

    async def append_audit(self, entry: AuditEntry, now: float) -> None:
        # One statement: committed by itself, with no BEGIN/COMMIT of its own.
        await self._alone(lambda tx: _append(tx, entry, now))

    async def audit_tail(
        self, *, limit: int, job_id: str | None = None, agent: str | None = None, after_seq: int | None = None
    ) -> list[AuditRecord]:
        rows = await self._read(
            lambda tx: tx.all(
                f"SELECT * FROM (SELECT {_AUDIT_COLUMNS} FROM audit WHERE (%s::text IS NULL OR job_id = %s::text) "  # noqa: S608
                "AND (%s::text IS NULL OR agent = %s::text) AND seq > %s ORDER BY seq DESC LIMIT %s) AS t ORDER BY seq",
                (job_id, job_id, agent, agent, after_seq or 0, limit),
            )
        )
        return [AuditRecord(**row) for row in rows]

    async def audit_since(
        self, *, after_seq: int, limit: int, job_id: str | None = None, agent: str | None = None
    ) -> list[AuditRecord]:
        rows = await self._read(
            lambda tx: tx.all(
                f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE seq > %s AND (%s::text IS NULL OR job_id = %s::text) "  # noqa: S608
                "AND (%s::text IS NULL OR agent = %s::text) ORDER BY seq LIMIT %s",
                (after_seq, job_id, job_id, agent, agent, limit),
            )
        )
        return [AuditRecord(**row) for row in rows]

    async def audit_pages(self, *, after_seq: int = 0, page_size: int = 1000) -> AsyncGenerator[list[AuditRecord]]:
        while page := await self.audit_since(after_seq=after_seq, limit=page_size):
            yield page
            after_seq = page[-1].seq

    async def audit_highest_seq(self) -> int:
        row = await self._read(
            lambda tx: tx.one(
                "SELECT greatest((SELECT seq FROM audit_head), coalesce((SELECT max(seq) FROM audit), 0)) AS seq"
            )
        )
        assert row is not None
        return int(row["seq"])

    # -- moving an installation (`qpu-gateway db copy`) ---------------------------------------

    async def schema_state(self) -> SchemaState:
        async def work(tx: Tx) -> list[str]:
            found = await tx.one("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")
            if not (found and found["present"]):
                return []
            return [row["name"] for row in await tx.all("SELECT name FROM schema_migrations ORDER BY name")]

        applied = await self._read(work)
        known = sorted(
            entry.name
            for entry in resources.files("qpu_gateway.store.migrations.postgres").iterdir()
            if entry.name.endswith(".sql")
        )
        return SchemaState(
            applied=tuple(applied),
            pending=tuple(name for name in known if name not in applied),
            unknown=tuple(name for name in applied if name not in known),
        )

    async def row_counts(self) -> dict[str, int]:
        row = await self._read(lambda tx: tx.one(_ROW_COUNTS))
        assert row is not None
        return {table: int(row[table]) for table in INSTALLATION_TABLES}

    async def export_rows(self, *, page_size: int = 1000) -> AsyncGenerator[TablePage]:
        # One REPEATABLE READ transaction for every table: one snapshot, whoever writes meanwhile;
        # a cursor per table, fetched a page at a time.
        async with self._db.transaction() as tx:
            await tx.run("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            for table, order in INSTALLATION_TABLES.items():
                cursor = f"export_{table}"
                await tx.run(f"DECLARE {cursor} NO SCROLL CURSOR FOR SELECT * FROM {table} ORDER BY {order}")  # noqa: S608 (constants)
                while rows := await tx.all(f"FETCH FORWARD {int(page_size)} FROM {cursor}"):
                    yield TablePage(table, tuple(rows[0]), [tuple(row.values()) for row in rows])
                await tx.run(f"CLOSE {cursor}")

    async def import_rows(
        self,
        pages: AsyncIterable[TablePage],
        *,
        now: float,
        audit: Callable[[Mapping[str, int]], AuditEntry] | None = None,
    ) -> dict[str, int]:
        counts = dict.fromkeys(INSTALLATION_TABLES, 0)
        try:
            async with self._db.transaction() as tx:
                # Held to commit: a gateway started on this database meanwhile reads, but writes
                # nothing until the copy is in (and then sees every row of it at once).
                await tx.run(f"LOCK TABLE {', '.join(INSTALLATION_TABLES)}, audit_head IN EXCLUSIVE MODE")
                held = await tx.one(_ROW_COUNTS)
                assert held is not None
                if any(int(n) for n in held.values()):
                    raise StoreError(not_empty({table: int(n) for table, n in held.items()}), kind="refused")
                columns: dict[str, set[str]] = {table: set() for table in INSTALLATION_TABLES}
                for row in await tx.all(
                    "SELECT table_name, column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = ANY(%s::text[])",
                    (list(INSTALLATION_TABLES),),
                ):
                    columns[row["table_name"]].add(row["column_name"])
                async for page in pages:
                    # A page is one statement: its rows as one JSON array of objects, which
                    # json_populate_recordset turns into the table's own types (floats exactly,
                    # SQLite's 0/1 into booleans).
                    data = json.dumps([dict(zip(page.columns, row, strict=True)) for row in page.rows])
                    await tx.run(_insert_page_sql(page, columns), (data,))
                    counts[page.table] += len(page.rows)
                # New jobs queue after the copied ones; the chain goes on from the copied head.
                await tx.run(
                    "SELECT setval(pg_get_serial_sequence('jobs', 'seq'), coalesce(max(seq), 0) + 1, false) FROM jobs"
                )
                await tx.run(
                    "UPDATE audit_head SET seq = coalesce((SELECT max(seq) FROM audit), 0), "
                    "row_hash = (SELECT row_hash FROM audit ORDER BY seq DESC LIMIT 1)"
                )
                if audit is not None:
                    await _append(tx, audit(counts), now)
        except Retry as exc:
            raise StoreError(
                f"the database aborted the copy: {exc}; nothing was written", retry_after_s=1.0, kind="aborted"
            ) from None
        return counts


# -- pieces of transactions ----------------------------------------------------------------------


@dataclass(slots=True)
class _Claimer:
    """One worker's claim round, inside its transaction."""

    tx: Tx
    owner: str
    lease_s: float
    now: float
    may_run: MayRun | None
    providers: list[str]
    # The claim locks this transaction holds: (class, name).
    locks: set[tuple[int, str]] | None = None

    # The last candidates' read returned every claimable job, and the one taken was the last of
    # them: no need to read again for another.
    exhausted: bool = False

    async def next(self, busy: list[str], turn: float, *, room_for: int) -> JobRecord | None:
        """Claim the next claimable job; `turn` is when its agent's turn is recorded as taken."""
        held_back: set[str] = set()  # at a running cap, or being claimed by another replica now
        while True:
            wanted = room_for + 8
            candidates = await self.tx.all(
                _CLAIM_CANDIDATES,
                (self.now, self.now, self.providers, busy, sorted(held_back), wanted),
            )
            if not candidates:
                self.exhausted = True
                return None
            before = len(held_back)
            taken = await self._take_first(candidates, held_back, turn)
            if taken is not None:
                job, index = taken
                self.exhausted = len(candidates) < wanted and index == len(candidates) - 1
                return job
            if len(held_back) == before:
                self.exhausted = True
                return None

    async def _claim_locks(self, wanted: list[tuple[int, str]]) -> bool:
        """Hold the claim locks `wanted` (project before agent) to the end of this transaction.

        The first ones a transaction takes it waits for; once it holds any, it only tries (and the
        caller skips a job whose lock another claimer has). A transaction that waits thus holds at
        most one project lock, and whoever holds what it waits for waits for nothing: no deadlock.
        Locks waited for are one statement sent without waiting for its answer (it travels with the
        next read); locks tried are one statement whose answer is read.
        """
        if self.locks is None:
            self.locks = set()
        missing = [key for key in wanted if key not in self.locks]
        if not missing:
            return True
        params = [x for key in missing for x in key]
        if not self.locks:
            await self.tx.run(_locks("pg_advisory_xact_lock", len(missing)), params)
            self.locks.update(missing)
            return True
        row = await self.tx.one(_locks("pg_try_advisory_xact_lock", len(missing)), params)
        assert row is not None
        got = [key for i, key in enumerate(missing) if row[f"l{i}"]]
        self.locks.update(got)  # one tried and taken stays held, harmlessly, to the end
        return len(got) == len(missing)

    async def _take_first(
        self, candidates: list[Row], held_back: set[str], turn: float
    ) -> tuple[JobRecord, int] | None:
        for index, candidate in enumerate(candidates):
            seq, state, agent, project = candidate["seq"], candidate["state"], candidate["agent"], candidate["project"]
            queued = state == JobState.QUEUED.value
            if queued and agent in held_back:
                continue
            capped = queued and self.may_run is not None
            # The agent's lock: only its holder writes the agent's turn, and reads its running jobs.
            wanted = [(_CLAIM_PROJECT, project)] if capped else []
            if not await self._claim_locks([*wanted, (_CLAIM_AGENT, agent)]):
                held_back.add(agent)  # another replica is claiming this agent's jobs right now
                continue
            if capped:
                assert self.may_run is not None
                # Read after the locks' statement ended: the counts include every claim committed before.
                row = await self.tx.one(_CANDIDATE_WITH_COUNTS, (seq,))
                if row is None:
                    continue
                agent_running, project_running = int(row.pop("_agent_running")), int(row.pop("_project_running"))
                if not self.may_run(Candidate(candidate["id"], agent, project), agent_running, project_running):
                    held_back.add(agent)
                    continue
            now = self.now
            audit = AuditEntry(
                tool="job.claimed",
                decision="event",
                agent=agent,
                project=project,
                job_id=candidate["id"],
                detail=f"worker {self.owner}, run {int(candidate['runs']) + 1}",
            )
            claimed = await self.tx.one(
                _CLAIM,
                (self.owner, now + self.lease_s, now, now, seq, now, now, turn, *_audit_params(audit, now)),
            )
            if claimed is None:
                continue
            return _job(claimed), index
        return None


def _notification_params(row: NewNotification, now: float) -> tuple[Any, ...]:
    return (row.hook, row.event, row.dedup_key, row.agent, row.project, row.job_id, row.body, now, now)


async def _append(tx: Tx, entry: AuditEntry, now: float) -> None:
    """Append one audit row chained to the last, in one statement sent without waiting (it travels
    with the commit): the head row's lock is taken here and held to commit, so call this last in a
    transaction (every other replica's append waits for it)."""
    await tx.run(_APPEND, _audit_params(entry, now))


def _audit_params(entry: AuditEntry, now: float) -> tuple[Any, ...]:
    """The parameters of `_AUDIT_HEAD_CTE` then `_AUDIT_ROW` for one row."""
    content = {
        "seq": _SEQ_MARK,
        "at": float(now),
        "agent": entry.agent,
        "project": entry.project,
        "key_id": entry.key_id,
        "tool": entry.tool,
        "decision": entry.decision,
        "error_code": entry.error_code,
        "args_hash": entry.args_hash,
        "job_id": entry.job_id,
        "detail": entry.detail,
        "operator": entry.operator,
    }
    # canonical() is ASCII, key-sorted compact JSON: "seq":N occurs once, as the key (a string value
    # holding those characters has its quotes escaped), and the server's ::text of a bigint is str(N).
    before, after = canonical(content).decode("ascii").split(f'"seq":{_SEQ_MARK}')
    head = (GENESIS, GENESIS, before + '"seq":', after)
    row = (
        float(now),
        entry.agent,
        entry.project,
        entry.key_id,
        entry.tool,
        entry.decision,
        entry.error_code,
        entry.args_hash,
        entry.job_id,
        entry.detail,
        entry.operator,
    )
    return (*head, *row)


async def _retrying(run: Callable[[], Awaitable[T]], what: str) -> T:
    """`run()`, again (at most `_RETRIES` times, backing off) while the server aborts it as a deadlock
    or a serialization failure."""
    for attempt in range(_RETRIES):
        try:
            return await run()
        except Retry as exc:
            if attempt == _RETRIES - 1:
                raise StoreError(
                    f"the database kept aborting the {what}: {exc}", retry_after_s=1.0, kind="aborted"
                ) from None
            await anyio.sleep(0.01 * 2**attempt)
    raise AssertionError("unreachable")


def _moved_audit_params(entry: AuditEntry, now: float) -> tuple[Any, ...]:
    """The parameters of `_MOVED_AUDIT` for the row of a move: as `_audit_params`, with the canonical
    JSON cut around the error code's place too (the server puts the code the move leaves there)."""
    marked = dataclasses.replace(entry, error_code=_CODE_MARK)
    params = _audit_params(marked, now)
    genesis, genesis_too, before_seq, after_seq = params[:4]
    first, middle = before_seq.split(f'"{_CODE_MARK}"')
    row = list(params[4:])
    row[6] = entry.error_code  # the code column: the entry's, else (in SQL) the one the move leaves
    return (genesis, genesis_too, first, entry.error_code, middle, after_seq, *row)


def _totals_statements(column: Literal["agent", "project"], who: str, day: str, month: str) -> list[Statement]:
    return [
        (_TOTALS_BY[column], (day, day, day, month, month, month, who)),
        (_COUNTS_BY[column], (who,)),
    ]


def _json(value: Any) -> Any:
    """A json column's value: psycopg decodes it, a driver that does not (asyncpg) hands back its text."""
    return json.loads(value) if isinstance(value, str) else value


def _totals_params(who: str, day: str, month: str) -> tuple[str, ...]:
    return (day, day, day, month, month, month, who)


def _totals(sums: list[Row], counts: Row) -> LedgerTotals:
    committed: dict[str, tuple[int, int, int]] = {}
    reserved: dict[str, tuple[int, int, int]] = {}
    for row in sums:
        target = committed if row["status"] == "committed" else reserved
        target["day"] = (int(row["d_cost"]), int(row["d_shots"]), int(row["d_qpu"]))
        target["month"] = (int(row["m_cost"]), int(row["m_shots"]), int(row["m_qpu"]))
        target["total"] = (int(row["t_cost"]), int(row["t_shots"]), int(row["t_qpu"]))
    return LedgerTotals(
        committed=committed,
        reserved=reserved,
        queued_jobs=int(counts["waiting"]),
        running_jobs=int(counts["running"]),
    )


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
        job.simulator,
        job.pricing_known,
        job.qpu_seconds_estimate,
        job.approval_level,
        job.approval_expires_at,
        job.approved_by,
        now if job.state is JobState.QUEUED else None,
        job.trace_parent,
    )


def _job(row: Row) -> JobRecord:
    data = dict(row)
    data["circuits"] = tuple(json.loads(data["circuits"]))
    data["state"] = JobState(data["state"])
    data["result"] = None if data["result"] is None else tuple(json.loads(data["result"]))
    return JobRecord(**data)


def _operator(row: Row) -> OperatorRecord:
    disabled = row["disabled_at"]
    return OperatorRecord(
        str(row["name"]),
        str(row["role"]),
        str(row["password_hash"]),
        float(row["created_at"]),
        None if disabled is None else float(disabled),
    )


def _pause(row: Row) -> Pause:
    return Pause(row["kind"], row["name"], row["reason"], row["paused_by"], row["paused_at"])


def _key(row: Row) -> KeyRecord:
    data = dict(row)
    data["scopes"] = frozenset(s for s in data["scopes"].split(",") if s)
    reason, by, at = data.pop("pause_reason"), data.pop("paused_by"), data.pop("paused_at")
    if at is not None:
        data["agent_pause"] = Pause("agent", data["agent"], reason, by, at)
    return KeyRecord(**data)


def initialised(url: str) -> bool:
    """True if the database exists and `qpu-gateway init` (or any migration) has set it up; raises
    StoreError (unavailable) when the server cannot be reached."""
    from qpu_gateway.store import pg_psycopg

    rows = pg_psycopg.probe(url, "SELECT to_regclass('schema_migrations') IS NOT NULL", timeout_s=connect_timeout_s())
    if not rows or not rows[0][0]:
        return False
    counted = pg_psycopg.probe(url, "SELECT count(*) FROM schema_migrations", timeout_s=connect_timeout_s())
    return counted is not None and int(counted[0][0]) > 0


def create_database(url: str) -> bool:
    """Create the URL's database if it is missing (`qpu-gateway init`); True if it was created."""
    from qpu_gateway.store import pg_psycopg

    return pg_psycopg.create_database(url, timeout_s=connect_timeout_s())


# -- moving an installation --------------------------------------------------------------------

_COUNTS_OF = [f"(SELECT count(*) FROM {table}) AS {table}" for table in INSTALLATION_TABLES]  # noqa: S608
_ROW_COUNTS = "SELECT " + ", ".join(_COUNTS_OF)


def _insert_page_sql(page: TablePage, columns: Mapping[str, set[str]]) -> str:
    """The INSERT for a page's rows (one JSON parameter); its table and columns must be this schema's
    (names are checked, never taken on trust from the other database)."""
    if page.table not in columns:
        raise StoreError(f"{page.table!r} is not a table a copy moves")
    foreign = [name for name in page.columns if name not in columns[page.table]]
    if foreign:
        raise StoreError(
            f"the source's {page.table} rows have columns this database does not ({', '.join(foreign)}): "
            "bring both to the same version (`qpu-gateway db migrate`); nothing was written"
        )
    names = ", ".join(f'"{name}"' for name in page.columns)
    # OVERRIDING SYSTEM VALUE: jobs.seq is an identity column, and a copied job keeps its seq.
    return (
        f"INSERT INTO {page.table} ({names}) OVERRIDING SYSTEM VALUE "  # noqa: S608 (checked names)
        f"SELECT {names} FROM json_populate_recordset(NULL::{page.table}, %s::json)"
    )
