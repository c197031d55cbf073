"""The store on both backends (a real SQLite file, a fresh PostgreSQL database): migrations, the durable
queue's leases, the audit log, and listings. Every test runs on each backend through `database`."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import closing, nullcontext
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import anyio
import psycopg
import pytest

from qpu_gateway.audit.chain import ChainVerifier
from qpu_gateway.config import Database
from qpu_gateway.jobs.states import JobState
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.store import Store, open_store
from qpu_gateway.store.records import (
    AdmissionFacts,
    AuditEntry,
    Candidate,
    JobRecord,
    KeyRecord,
    LedgerTotals,
    NewJob,
    OperatorRecord,
    ProcessReport,
    SessionRecord,
    StateUsage,
)

from .databases import BACKENDS, database_of, execute, query
from .support import BELL2, BELL3

pytestmark = pytest.mark.anyio

T0 = 1_000.0  # the store takes time as an argument, so leases are tested without sleeping
DAY, MONTH = "1970-01-01", "1970-01"  # the UTC day and month T0 counts in
LEASE_S = 30.0
LOOP_WINDOW_S = 600.0
INJECTION = "x'); DROP TABLE jobs;--"
MIGRATIONS = [
    "0001_core.sql",
    "0002_policy.sql",
    "0003_audit_chain.sql",
    "0004_operator.sql",
    "0005_worker_retries_and_timeouts.sql",
    "0006_processes.sql",
    "0007_ledger_in_jobs.sql",
    "0008_telemetry.sql",
    "0009_notifications.sql",
    "0010_operators.sql",
]
# PostgreSQL's audit head keeps the hash its last row chained to (one-statement appends); SQLite's needs no head.
POSTGRES_MIGRATIONS = [
    *MIGRATIONS[:6],
    "0007_audit_head_prev.sql",
    "0008_ledger_in_jobs.sql",
    "0009_telemetry.sql",
    "0010_notifications.sql",
    "0011_operators.sql",
]


def new_job(
    job_id: str,
    *,
    agent: str = "alice",
    project: str = "default",
    name: str | None = None,
    backend: str = "aer/simulator",
    shots: int = 100,
    circuits: int = 1,
    fingerprint: str = "f" * 64,
    estimate_micro_usd: int = 0,
    qpu_seconds_estimate: float = 0.0,
    state: JobState = JobState.QUEUED,
    priority: int = 1,
    idempotency_key: str | None = None,
    simulator: bool = True,
    approval_expires_at: float | None = None,
) -> NewJob:
    return NewJob(
        id=job_id,
        agent=agent,
        project=project,
        key_id="k1",
        name=name,
        backend=backend,
        shots=shots,
        circuits=tuple([BELL2, BELL3][i % 2] for i in range(circuits)),
        qubits=2,
        depth=3,
        two_qubit_gates=1,
        fingerprint=fingerprint,
        estimate_micro_usd=estimate_micro_usd,
        state=state,
        priority=priority,
        idempotency_key=idempotency_key,
        simulator=simulator,
        qpu_seconds_estimate=qpu_seconds_estimate,
        approval_expires_at=approval_expires_at,
    )


def admission(job: NewJob) -> AuditEntry:
    return AuditEntry(tool="submit_job", decision="ok", agent=job.agent, project=job.project, job_id=job.id)


def admit_all(facts: AdmissionFacts) -> Refusal | None:
    return None


async def submit(store: Store, job: NewJob, now: float = T0, audit: AuditEntry | None = None) -> JobRecord:
    """Admit a job that the policy lets through, and return it as stored."""
    outcome = await store.admit(job, audit or admission(job), now, loop_window_s=LOOP_WINDOW_S, decide=admit_all)
    assert not isinstance(outcome, Refusal)
    stored, created = outcome
    assert created
    return stored


def row_counts(db: Database) -> dict[str, int]:
    """Rows in the tables admission writes, read from the database directly (not through the store)."""
    return {table: query(db, f"SELECT count(*) FROM {table}")[0][0] for table in ("jobs", "ledger", "audit")}


def ledger_row(db: Database, job_id: str) -> tuple[str, int, int, int]:
    """(status, micro-dollars, shots, QPU milliseconds) of one job's ledger row."""
    rows = query(db, "SELECT status, cost_micro_usd, shots, qpu_millis FROM ledger WHERE job_id = ?", (job_id,))
    assert rows, f"no ledger row for {job_id}"
    row = rows[0]
    return row[0], row[1], row[2], row[3]


@pytest.fixture(params=BACKENDS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh database of each backend: a SQLite file, and a PostgreSQL database of this test's own."""
    with database_of(request.param, tmp_path, "g.db") as db:
        yield db


@pytest.fixture
async def store(database: Database) -> AsyncIterator[Store]:
    opened = await open_store(database)
    yield opened
    await opened.close()


@pytest.fixture
async def other_store(database: Database, store: Store) -> AsyncIterator[Store]:
    """A second store on the same database, as a second gateway process would hold."""
    opened = await open_store(database)
    yield opened
    await opened.close()


# -- migrations ---------------------------------------------------------------------------------------


async def test_migrating_twice_applies_nothing_the_second_time(database: Database) -> None:
    expected = POSTGRES_MIGRATIONS if database.is_postgres else MIGRATIONS
    store = await open_store(database, migrate=False)
    try:
        assert await store.migrate() == expected
        assert await store.migrate() == []
    finally:
        await store.close()

    assert query(database, "SELECT name FROM schema_migrations ORDER BY name") == [(name,) for name in expected]


def schema_before_ledger_in_jobs(database: Database) -> None:
    """The database as the previous version left it: every migration before the one that moved the
    ledger into the jobs' rows, three jobs and their ledger rows (reserved, committed, released)."""
    dialect = "postgres" if database.is_postgres else "sqlite"
    scripts = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in resources.files(f"qpu_gateway.store.migrations.{dialect}").iterdir()
        if entry.name.endswith(".sql") and not entry.name.endswith("_ledger_in_jobs.sql")
    )
    rows = [
        ("job_r", "queued", "reserved", 1_500_000, 200, 40, None),
        ("job_c", "succeeded", "committed", 700_000, 100, 12, T0 + 9),
        ("job_x", "cancelled", "released", 900_000, 300, 50, T0 + 8),
    ]
    statements: list[tuple[str, tuple[object, ...]]] = [
        ("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)", ())
    ]
    for job_id, state, status, cost, shots, millis, settled in rows:
        statements += [
            (
                "INSERT INTO jobs (id, agent, project, key_id, backend, shots, circuits, n_circuits, qubits, depth, "
                "two_qubit_gates, fingerprint, estimate_micro_usd, state, created_at, updated_at) "
                "VALUES (?, 'alice', 'p1', 'k1', 'aer/simulator', 100, '[]', 1, 2, 2, 1, 'f', ?, ?, ?, ?)",
                (job_id, cost, state, T0, T0),
            ),
            (
                "INSERT INTO ledger (job_id, agent, project, day, month, status, cost_micro_usd, shots, qpu_millis, "
                "reserved_at, settled_at) VALUES (?, 'alice', 'p1', ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, DAY, MONTH, status, cost, shots, millis, T0, settled),
            ),
        ]
    if database.is_postgres:
        assert database.url is not None
        with psycopg.connect(database.url, autocommit=True) as conn:
            conn.execute(statements[0][0])
            for name, script in scripts:
                conn.execute(script.encode())  # several statements: sent as one simple query
                conn.execute("INSERT INTO schema_migrations VALUES (%s, 0)", (name,))
            for sql, params in statements[1:]:
                conn.execute(sql.replace("?", "%s").encode(), params)
        return
    assert database.path is not None
    with closing(sqlite3.connect(database.path)) as db:
        db.execute(statements[0][0])
        for name, script in scripts:
            db.executescript(script)
            db.execute("INSERT INTO schema_migrations VALUES (?, 0)", (name,))
        for sql, params in statements[1:]:
            db.execute(sql, params)
        db.commit()


async def test_the_ledger_moves_into_the_jobs_rows_and_reads_the_same(database: Database) -> None:
    schema_before_ledger_in_jobs(database)
    ledger = "SELECT job_id, agent, project, day, month, status, cost_micro_usd, shots, qpu_millis, reserved_at, "
    ledger += "settled_at FROM ledger ORDER BY job_id"
    before = query(database, ledger)
    store = await open_store(database)
    try:
        assert query(database, ledger) == before  # the view shows every row as the table held it
        totals = await store.ledger_totals("agent", "alice", T0)
        assert totals.reserved["day"] == (1_500_000, 200, 40)
        assert totals.committed["month"] == (700_000, 100, 12)  # released amounts count nowhere
        job = await store.get_job("job_r")
        assert job is not None and (job.ledger_status, job.ledger_micro_usd) == ("reserved", 1_500_000)
        # The migrated reservation settles as a new one does.
        assert await store.transition("job_r", JobState.CANCELLED, T0 + 20) is not None
        assert ledger_row(database, "job_r") == ("released", 1_500_000, 200, 40)
        assert (await store.ledger_totals("agent", "alice", T0)).reserved == {}
    finally:
        await store.close()


async def test_reopening_a_migrated_file_keeps_its_rows(database: Database) -> None:
    first = await open_store(database)
    await submit(first, new_job("job_kept"))
    await first.close()

    second = await open_store(database)
    try:
        assert await second.migrate() == []
        kept = await second.get_job("job_kept")
    finally:
        await second.close()
    assert kept is not None and kept.state is JobState.QUEUED


async def test_two_stores_migrating_one_new_file_at_once_both_succeed_and_apply_it_once(database: Database) -> None:
    stores = [await open_store(database, migrate=False), await open_store(database, migrate=False)]
    applied: list[list[str]] = []

    async def migrate(store: Store) -> None:
        applied.append(await store.migrate())

    try:
        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(migrate, store)
    finally:
        for store in stores:
            await store.close()

    assert sorted(applied) == [[], POSTGRES_MIGRATIONS if database.is_postgres else MIGRATIONS]


async def test_several_processes_opening_a_new_file_at_once_all_get_a_working_store(database: Database) -> None:
    opened: list[Store] = []

    async def open_one() -> None:
        opened.append(await open_store(database))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(open_one)
    try:
        await submit(opened[0], new_job("job_seen_by_all"))
        for store in opened:
            assert await store.get_job("job_seen_by_all") is not None
    finally:
        for store in opened:
            await store.close()


# -- claiming -----------------------------------------------------------------------------------------


async def test_a_claimed_job_is_submitting_and_leased_to_its_worker(store: Store) -> None:
    await submit(store, new_job("job_1"))

    claimed = await store.claim(["aer"], [], "worker-a", LEASE_S, T0 + 1)

    assert claimed is not None and claimed.id == "job_1"
    assert claimed.state is JobState.SUBMITTING
    assert (claimed.lease_owner, claimed.lease_expires) == ("worker-a", T0 + 1 + LEASE_S)
    assert (claimed.runs, claimed.started_at, claimed.version) == (1, T0 + 1, 2)
    assert await store.claim(["aer"], [], "worker-b", LEASE_S, T0 + 2) is None


async def test_claim_takes_the_oldest_job_of_the_workers_providers_and_skips_busy_backends(store: Store) -> None:
    await submit(store, new_job("job_ibm", backend="ibm/ibm_torino"))
    await submit(store, new_job("job_busy", backend="aer/busy"))
    await submit(store, new_job("job_free", backend="aer/simulator"))
    await submit(store, new_job("job_later", backend="aer/simulator"))

    claimed = await store.claim(["aer"], ["aer/busy"], "w", LEASE_S, T0)

    assert claimed is not None and claimed.id == "job_free"
    assert await store.claim([], [], "w", LEASE_S, T0) is None
    # "ae" is not a prefix match for "aer/...": providers are matched up to the slash.
    assert await store.claim(["ae"], [], "w", LEASE_S, T0) is None


async def test_concurrent_claims_from_two_connections_take_each_job_exactly_once(
    store: Store, other_store: Store
) -> None:
    for n in range(50):
        await submit(store, new_job(f"job_{n:02d}"))
    claims: list[tuple[str, str]] = []

    async def drain(connection: Store, owner: str) -> None:
        while (job := await connection.claim(["aer"], [], owner, LEASE_S, T0)) is not None:
            claims.append((job.id, owner))
            await anyio.sleep(0.02)  # a worker does some work between claims (and lets the other in)

    async with anyio.create_task_group() as tg:
        for loop in range(3):
            tg.start_soon(drain, store, f"worker-a{loop}")
            tg.start_soon(drain, other_store, f"worker-b{loop}")

    ids = [job_id for job_id, _ in claims]
    assert len(ids) == 50
    assert set(ids) == {f"job_{n:02d}" for n in range(50)}
    assert {owner[:-1] for _, owner in claims} == {"worker-a", "worker-b"}, "both connections took part"
    for job_id, owner in claims:
        job = await store.get_job(job_id)
        assert job is not None
        assert (job.state, job.runs, job.lease_owner) == (JobState.SUBMITTING, 1, owner)
    claimed_audit = [row for row in await store.audit_tail(limit=500) if row.tool == "job.claimed"]
    assert len(claimed_audit) == 50


async def test_a_job_whose_lease_expired_is_claimed_by_another_worker_in_the_state_it_reached(
    store: Store, other_store: Store
) -> None:
    await submit(store, new_job("job_1"))
    await store.claim(["aer"], [], "worker-a", LEASE_S, T0)
    running = await store.transition(
        "job_1", JobState.RUNNING, T0 + 1, owner="worker-a", fields={"provider_ref": "prov-123"}
    )
    assert running is not None and running.provider_ref == "prov-123"

    # worker-a stops heartbeating; while its lease lasts nobody else may take the job.
    assert await other_store.claim(["aer"], [], "worker-b", LEASE_S, T0 + LEASE_S - 1) is None
    taken = await other_store.claim(["aer"], [], "worker-b", LEASE_S, T0 + LEASE_S + 1)

    assert taken is not None and taken.id == "job_1"
    assert taken.state is JobState.RUNNING  # polled again, never submitted twice
    assert taken.provider_ref == "prov-123"
    assert (taken.lease_owner, taken.runs, taken.started_at) == ("worker-b", 2, T0)
    # The old worker has lost it: its heartbeat no longer holds the job.
    assert await store.heartbeat(["job_1"], "worker-a", T0 + 100) == set()


async def test_heartbeat_extends_only_the_leases_its_owner_holds(store: Store) -> None:
    await submit(store, new_job("job_a"))
    await submit(store, new_job("job_b"))
    await store.claim(["aer"], [], "worker-a", LEASE_S, T0)
    await store.claim(["aer"], [], "worker-b", LEASE_S, T0)

    held = await store.heartbeat(["job_a", "job_b", "job_missing"], "worker-a", T0 + 500)

    assert held == {"job_a"}
    job_a, job_b = await store.get_job("job_a"), await store.get_job("job_b")
    assert job_a is not None and job_a.lease_expires == T0 + 500
    assert job_b is not None and job_b.lease_expires == T0 + LEASE_S
    assert await store.heartbeat([], "worker-a", T0 + 600) == set()


async def test_hand_back_requeues_unsubmitted_jobs_and_frees_submitted_ones_for_polling(store: Store) -> None:
    await submit(store, new_job("job_unsent"))
    await submit(store, new_job("job_sent"))
    await submit(store, new_job("job_other_worker"))
    await store.claim(["aer"], [], "worker-a", LEASE_S, T0)
    await store.claim(["aer"], [], "worker-a", LEASE_S, T0)
    await store.claim(["aer"], [], "worker-b", LEASE_S, T0)
    await store.transition("job_sent", JobState.RUNNING, T0, owner="worker-a", fields={"provider_ref": "prov-9"})

    assert await store.hand_back("worker-a", T0 + 1) == 2

    unsent, sent, other = [await store.get_job(i) for i in ("job_unsent", "job_sent", "job_other_worker")]
    assert unsent is not None and sent is not None and other is not None
    assert (unsent.state, unsent.lease_owner, unsent.provider_ref) == (JobState.QUEUED, None, None)
    assert (sent.state, sent.lease_owner, sent.provider_ref) == (JobState.RUNNING, None, "prov-9")
    assert (other.state, other.lease_owner) == (JobState.SUBMITTING, "worker-b")

    # Well before worker-b's lease ends, a new worker picks up both handed-back jobs at once: the
    # one already at the provider first (orphaned work before new work), then the requeued one.
    first = await store.claim(["aer"], [], "worker-c", LEASE_S, T0 + 2)
    second = await store.claim(["aer"], [], "worker-c", LEASE_S, T0 + 2)
    assert first is not None and second is not None
    assert (first.id, first.state, first.provider_ref) == ("job_sent", JobState.RUNNING, "prov-9")
    assert (second.id, second.state) == ("job_unsent", JobState.SUBMITTING)
    assert await store.claim(["aer"], [], "worker-c", LEASE_S, T0 + 2) is None


# -- transitions and the audit log --------------------------------------------------------------------


async def test_transition_refuses_a_move_the_table_forbids_and_writes_nothing(store: Store) -> None:
    queued = await submit(store, new_job("job_1"))

    assert await store.transition("job_1", JobState.SUCCEEDED, T0 + 1) is None
    assert await store.transition("job_1", JobState.RUNNING, T0 + 1) is None

    unchanged = await store.get_job("job_1")
    assert unchanged == queued
    assert [row.tool for row in await store.audit_tail(limit=10, job_id="job_1")] == ["submit_job"]


async def test_an_allowed_transition_updates_the_job_and_appends_an_audit_row(store: Store) -> None:
    await submit(store, new_job("job_1"))

    cancelled = await store.transition(
        "job_1", JobState.CANCELLED, T0 + 5, fields={"finished_at": T0 + 5, "error_code": "cancelled"}
    )

    assert cancelled is not None
    assert (cancelled.state, cancelled.version, cancelled.finished_at) == (JobState.CANCELLED, 2, T0 + 5)
    audit = await store.audit_tail(limit=10, job_id="job_1")
    assert [(row.tool, row.decision) for row in audit] == [("submit_job", "ok"), ("job.cancelled", "event")]
    assert (audit[-1].agent, audit[-1].error_code, audit[-1].at) == ("alice", "cancelled", T0 + 5)
    # And a cancelled job stays cancelled.
    assert await store.transition("job_1", JobState.QUEUED, T0 + 6) is None


async def test_a_transition_with_an_owner_needs_that_worker_to_hold_the_lease(store: Store) -> None:
    await submit(store, new_job("job_1"))
    await store.claim(["aer"], [], "worker-a", LEASE_S, T0)

    assert await store.transition("job_1", JobState.RUNNING, T0 + 1, owner="worker-b") is None
    moved = await store.transition("job_1", JobState.RUNNING, T0 + 1, owner="worker-a")
    assert moved is not None and moved.state is JobState.RUNNING


async def test_a_lease_holders_moves_with_the_job_in_hand_are_audited_chained_and_settled(
    store: Store, database: Database
) -> None:
    """With the job as the worker holds it, PostgreSQL writes a move and its audit row in one
    statement: the rows say what the moves did (the error code the job was left with included),
    the chain verifies, the reservation settles, and a move that does not apply writes nothing."""
    await submit(store, new_job("job_h", estimate_micro_usd=4_000))
    claimed = await store.claim(["aer"], [], "w1", LEASE_S, T0)
    assert claimed is not None
    running = await store.transition(
        "job_h", JobState.RUNNING, T0 + 1, owner="w1", fields={"provider_ref": "p-1"}, held=claimed
    )
    assert running is not None and (running.state, running.provider_ref) == (JobState.RUNNING, "p-1")
    assert await store.transition("job_h", JobState.SUCCEEDED, T0 + 2, owner="w2", held=running) is None
    failed = await store.transition(
        "job_h",
        JobState.FAILED,
        T0 + 3,
        owner="w1",
        fields={"error_code": "provider_error", "error_message": "no", "lease_owner": None},
        audit=AuditEntry(tool="job.failed", decision="event", detail="the provider said no"),
        held=running,
    )
    assert failed is not None and failed.version == running.version + 1

    audit = await store.audit_tail(limit=10, job_id="job_h")
    assert [(r.tool, r.agent, r.project, r.error_code, r.at) for r in audit[1:]] == [
        ("job.claimed", "alice", "default", None, T0),
        ("job.running", "alice", "default", None, T0 + 1),
        ("job.failed", "alice", "default", "provider_error", T0 + 3),
    ]
    assert audit[-1].detail == "the provider said no"
    assert ledger_row(database, "job_h") == ("released", 4_000, 100, 0)
    verifier = ChainVerifier()
    async for page in store.audit_pages():
        verifier.feed(page)
    report = verifier.finish(await store.audit_highest_seq())
    assert report.intact and report.rows == 4
    with pytest.raises(ValueError, match="not an error code") if database.is_postgres else nullcontext():
        await store.transition(
            "job_h",
            JobState.FAILED,
            T0,
            owner="w1",
            audit=AuditEntry(tool="t", decision="event", error_code='"x'),
            held=failed,
        )


async def test_a_transition_cannot_set_columns_outside_its_list(store: Store) -> None:
    await submit(store, new_job("job_1"))

    for column in ("agent", "state = 'succeeded', agent", "shots"):
        with pytest.raises(ValueError, match="transition cannot set"):
            await store.transition("job_1", JobState.CANCELLED, T0, fields={column: "mallory"})

    job = await store.get_job("job_1")
    assert job is not None and (job.agent, job.state) == ("alice", JobState.QUEUED)


async def test_the_audit_log_refuses_updates_and_deletes(store: Store, database: Database) -> None:
    await store.append_audit(AuditEntry(tool="list_jobs", decision="ok", agent="alice", detail="first"), T0)

    refused = (sqlite3.DatabaseError, psycopg.Error)
    with pytest.raises(refused, match="append-only"):
        execute(database, "UPDATE audit SET detail = 'rewritten'")
    with pytest.raises(refused, match="append-only"):
        execute(database, "DELETE FROM audit")
    if database.is_postgres:
        with pytest.raises(refused, match="append-only"):
            execute(database, "TRUNCATE audit")

    [row] = await store.audit_tail(limit=10)
    assert (row.tool, row.detail, row.at) == ("list_jobs", "first", T0)


async def test_audit_tail_returns_the_latest_rows_oldest_first_and_follows_on(store: Store) -> None:
    for n in range(5):
        await store.append_audit(AuditEntry(tool=f"tool_{n}", decision="ok", agent="alice"), T0 + n)
    await store.append_audit(AuditEntry(tool="tool_bob", decision="ok", agent="bob"), T0 + 9)

    latest = await store.audit_tail(limit=3, agent="alice")
    assert [row.tool for row in latest] == ["tool_2", "tool_3", "tool_4"]
    after = await store.audit_tail(limit=10, after_seq=latest[0].seq)
    assert [row.tool for row in after] == ["tool_3", "tool_4", "tool_bob"]


# -- hostile strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [INJECTION, "Robert'); DROP TABLE audit;--", "' OR '1'='1", '"; DELETE FROM keys; --', "ünïcødé ☃ 'quoted'"],
)
async def test_hostile_strings_round_trip_unchanged_as_names_and_details(store: Store, payload: str) -> None:
    job = new_job("job_hostile", agent=payload, project=payload, name=payload, idempotency_key=payload)
    await submit(store, job, audit=AuditEntry(tool="submit_job", decision="ok", agent=payload, detail=payload))
    await store.append_audit(AuditEntry(tool="note", decision="event", agent=payload, detail=payload), T0)
    await store.insert_key(
        KeyRecord(
            id="k_hostile",
            secret_hash="0" * 64,
            agent=payload,
            project=payload,
            scopes=frozenset({"read"}),
            created_at=T0,
        )
    )

    stored = await store.get_job("job_hostile")
    assert stored is not None and (stored.agent, stored.project, stored.name) == (payload, payload, payload)
    assert stored.idempotency_key == payload
    [listed] = await store.list_jobs(agent=payload, state=None, limit=10, before_seq=None)
    assert listed.id == "job_hostile"
    audit = await store.audit_tail(limit=10, agent=payload)
    assert [(row.agent, row.detail) for row in audit] == [(payload, payload), (payload, payload)]
    key = await store.key_by_id("k_hostile")
    assert key is not None and (key.agent, key.project) == (payload, payload)
    # Nothing was dropped or deleted, and the filters matched only the literal string.
    assert await store.list_jobs(agent="alice", state=None, limit=10, before_seq=None) == []
    assert await store.key_count() == 1
    assert len(await store.list_jobs(agent=None, state=None, limit=10, before_seq=None)) == 1


# -- listings and usage -------------------------------------------------------------------------------


async def test_list_jobs_pages_newest_first_with_before_seq(store: Store) -> None:
    for n in range(7):
        await submit(store, new_job(f"job_a{n}", agent="alice"))
        await submit(store, new_job(f"job_b{n}", agent="bob"))

    pages, before = [], None
    while page := await store.list_jobs(agent="alice", state=None, limit=3, before_seq=before):
        pages.append([job.id for job in page])
        before = page[-1].seq

    assert pages == [["job_a6", "job_a5", "job_a4"], ["job_a3", "job_a2", "job_a1"], ["job_a0"]]


async def test_list_jobs_filters_by_state(store: Store) -> None:
    for n in range(3):
        await submit(store, new_job(f"job_{n}"))
    await store.transition("job_1", JobState.CANCELLED, T0)

    cancelled = await store.list_jobs(agent="alice", state=JobState.CANCELLED, limit=10, before_seq=None)
    queued = await store.list_jobs(agent="alice", state=JobState.QUEUED, limit=10, before_seq=None)

    assert [job.id for job in cancelled] == ["job_1"]
    assert [job.id for job in queued] == ["job_2", "job_0"]


async def test_usage_by_state_sums_shots_times_circuits_per_state_for_one_agent(store: Store) -> None:
    await submit(store, new_job("job_sweep", shots=100, circuits=3))
    await submit(store, new_job("job_single", shots=50, circuits=2))
    await submit(store, new_job("job_cancelled", shots=10, circuits=1))
    await submit(store, new_job("job_bobs", agent="bob", shots=9_999, circuits=9))
    await store.transition("job_cancelled", JobState.CANCELLED, T0)

    usage = await store.usage_by_state("alice")

    assert usage == [StateUsage(JobState.CANCELLED, jobs=1, shots=10), StateUsage(JobState.QUEUED, jobs=2, shots=400)]
    assert await store.usage_by_state("nobody") == []


async def test_a_stored_job_keeps_its_circuits_in_order(store: Store) -> None:
    stored = await submit(store, new_job("job_sweep", circuits=3))

    assert stored.circuits == (BELL2, BELL3, BELL2)
    assert stored.n_circuits == 3
    assert await store.get_job("job_sweep") == stored
    assert await store.get_job("job_nope") is None


async def test_job_versions_report_each_jobs_version_and_state_and_skip_unknown_ids(store: Store) -> None:
    await submit(store, new_job("job_1"))
    await submit(store, new_job("job_2"))
    await store.transition("job_1", JobState.CANCELLED, T0 + 1)

    assert await store.job_versions(["job_1", "job_2", "job_missing"]) == {
        "job_1": (2, JobState.CANCELLED),
        "job_2": (1, JobState.QUEUED),
    }
    assert await store.job_versions([]) == {}


# -- admission: the job, its reservation and its audit row in one transaction --------------------------


def utc(year: int, month: int, day: int, hour: int = 12) -> float:
    return datetime(year, month, day, hour, tzinfo=UTC).timestamp()


async def test_admit_writes_the_job_a_reserved_ledger_row_and_the_audit_row_together(
    store: Store, database: Database
) -> None:
    now = utc(2026, 3, 31, 23)
    job = new_job("job_1", shots=250, circuits=2, estimate_micro_usd=1_750_000, qpu_seconds_estimate=2.5005)

    outcome = await store.admit(job, admission(job), now, loop_window_s=LOOP_WINDOW_S, decide=admit_all)

    assert not isinstance(outcome, Refusal)
    stored, created = outcome
    assert created
    assert (stored.id, stored.state, stored.estimate_micro_usd, stored.created_at) == (
        "job_1",
        JobState.QUEUED,
        1_750_000,
        now,
    )
    assert row_counts(database) == {"jobs": 1, "ledger": 1, "audit": 1}
    # Shots are counted over all circuits; QPU time is whole milliseconds, rounded up.
    assert ledger_row(database, "job_1") == ("reserved", 1_750_000, 500, 2_501)
    assert query(database, "SELECT agent, project, day, month FROM ledger") == [
        ("alice", "default", "2026-03-31", "2026-03")
    ]
    [audit] = await store.audit_tail(limit=10)
    assert (audit.tool, audit.decision, audit.job_id, audit.at) == ("submit_job", "ok", "job_1", now)


async def test_decide_sees_the_ledger_of_the_agent_and_its_project_and_the_repeats_within_the_loop_window(
    store: Store,
) -> None:
    await submit(store, new_job("job_old", estimate_micro_usd=100), now=T0)
    await submit(store, new_job("job_recent", estimate_micro_usd=200), now=T0 + 100)
    await submit(store, new_job("job_bobs", agent="bob", estimate_micro_usd=400), now=T0 + 150)
    await submit(store, new_job("job_other_circuit", fingerprint="e" * 64, estimate_micro_usd=50), now=T0 + 160)
    await submit(store, new_job("job_other_backend", backend="aer/statevector"), now=T0 + 170)
    seen: list[AdmissionFacts] = []

    def record(facts: AdmissionFacts) -> Refusal | None:
        seen.append(facts)
        return None

    job = new_job("job_new", estimate_micro_usd=1)
    await store.admit(job, admission(job), T0 + 200, loop_window_s=150.0, decide=record)

    [facts] = seen
    # Within the last 150 s, alice sent this circuit to this backend once (job_recent); her older
    # job, bob's job, her other circuit and the same circuit on another backend do not count.
    assert facts.repeats == 1
    assert facts.agent == LedgerTotals(
        committed={},
        reserved={"day": (350, 400, 0), "month": (350, 400, 0), "total": (350, 400, 0)},
        queued_jobs=4,
        running_jobs=0,
    )
    assert facts.project.reserved["total"] == (750, 500, 0)
    assert (facts.project.queued_jobs, facts.project.running_jobs) == (5, 0)


async def test_a_refusal_from_decide_is_returned_and_nothing_is_written(store: Store, database: Database) -> None:
    await submit(store, new_job("job_first"))
    no = Refusal("quota_exhausted", "Your USD quota today (UTC) has $0.00 left.", rule="agent_quota.cost_usd.day")
    job = new_job("job_refused", estimate_micro_usd=5_000_000)

    outcome = await store.admit(job, admission(job), T0 + 1, loop_window_s=LOOP_WINDOW_S, decide=lambda facts: no)

    assert outcome == no
    assert row_counts(database) == {"jobs": 1, "ledger": 1, "audit": 1}
    assert await store.get_job("job_refused") is None
    assert (await store.ledger_totals("agent", "alice", T0 + 1)).reserved["total"] == (0, 100, 0)


async def test_an_idempotency_key_already_used_returns_the_earlier_job_and_writes_nothing(
    store: Store, database: Database
) -> None:
    first = await submit(store, new_job("job_first", idempotency_key="retry-7", estimate_micro_usd=1_000))
    asked: list[AdmissionFacts] = []

    def refuse_everything(facts: AdmissionFacts) -> Refusal | None:
        asked.append(facts)
        return Refusal("loop_detected", "stop", rule="loop_guard")

    retry = new_job("job_retry", idempotency_key="retry-7", shots=999, estimate_micro_usd=9_999)
    outcome = await store.admit(retry, admission(retry), T0 + 5, loop_window_s=LOOP_WINDOW_S, decide=refuse_everything)

    assert outcome == (first, False)
    assert asked == [], "a replay is answered before any policy decision"
    assert row_counts(database) == {"jobs": 1, "ledger": 1, "audit": 1}
    assert ledger_row(database, "job_first") == ("reserved", 1_000, 100, 0)
    # Keys are per agent: bob's same key is a new job.
    bobs = await submit(store, new_job("job_bobs", agent="bob", idempotency_key="retry-7"))
    assert bobs.id == "job_bobs"


# -- the ledger: reserve at admission, commit or release when the job ends -----------------------------


async def run_to(store: Store, job_id: str, end: JobState, now: float, **fields: object) -> JobRecord:
    """Take a queued job through submitting and running to `end`, as a worker would."""
    for state in (JobState.SUBMITTING, JobState.RUNNING):
        assert await store.transition(job_id, state, now) is not None
    ended = await store.transition(job_id, end, now, fields=fields)
    assert ended is not None
    return ended


async def test_a_succeeded_job_commits_its_actual_cost_where_reported_else_its_estimate(
    store: Store, database: Database
) -> None:
    await submit(store, new_job("job_reported", estimate_micro_usd=900_000, qpu_seconds_estimate=3.0))
    await submit(store, new_job("job_unreported", estimate_micro_usd=900_000, qpu_seconds_estimate=3.0))

    await run_to(
        store, "job_reported", JobState.SUCCEEDED, T0 + 9, actual_cost_micro_usd=700_001, actual_qpu_seconds=1.2341
    )
    await run_to(store, "job_unreported", JobState.SUCCEEDED, T0 + 9)

    assert ledger_row(database, "job_reported") == ("committed", 700_001, 100, 1_235)
    assert ledger_row(database, "job_unreported") == ("committed", 900_000, 100, 3_000)
    totals = await store.ledger_totals("agent", "alice", T0 + 9)
    assert totals.committed["total"] == (1_600_001, 200, 4_235)
    assert "total" not in totals.reserved


async def test_every_other_way_a_job_ends_releases_its_reservation_and_none_leaks(
    store: Store, database: Database
) -> None:
    held = JobState.PENDING_APPROVAL
    await submit(store, new_job("job_failed_in_queue", estimate_micro_usd=1_000))
    await submit(store, new_job("job_failed_running", estimate_micro_usd=2_000))
    await submit(store, new_job("job_cancelled", estimate_micro_usd=3_000))
    await submit(store, new_job("job_rejected", estimate_micro_usd=4_000, state=held))
    await submit(store, new_job("job_expired", estimate_micro_usd=5_000, state=held))
    await submit(store, new_job("job_handed_back", estimate_micro_usd=6_000))
    assert (await store.ledger_totals("agent", "alice", T0)).reserved["total"] == (21_000, 600, 0)

    await store.transition("job_failed_in_queue", JobState.FAILED, T0 + 1)
    await run_to(store, "job_failed_running", JobState.FAILED, T0 + 1, actual_cost_micro_usd=1_500)
    await store.transition("job_cancelled", JobState.CANCELLED, T0 + 1)
    await store.transition("job_rejected", JobState.REJECTED, T0 + 1)
    await store.transition("job_expired", JobState.EXPIRED, T0 + 61)
    # Handed back to the queue is not an ending: the job will still run, so it stays reserved.
    await store.transition("job_handed_back", JobState.SUBMITTING, T0 + 1)
    await store.transition("job_handed_back", JobState.QUEUED, T0 + 2)

    for job_id, cost in [
        ("job_failed_in_queue", 1_000),
        ("job_failed_running", 2_000),  # a failure is released at its reservation, never committed
        ("job_cancelled", 3_000),
        ("job_rejected", 4_000),
        ("job_expired", 5_000),
    ]:
        assert ledger_row(database, job_id) == ("released", cost, 100, 0)
    assert ledger_row(database, "job_handed_back") == ("reserved", 6_000, 100, 0)
    totals = await store.ledger_totals("agent", "alice", T0 + 61)
    assert totals.reserved["total"] == (6_000, 100, 0)
    assert totals.committed == {}

    await run_to(store, "job_handed_back", JobState.CANCELLED, T0 + 70)
    assert await store.ledger_totals("agent", "alice", T0 + 70) == LedgerTotals({}, {}, 0, 0)


async def test_ledger_totals_sum_reserved_and_committed_per_utc_day_month_and_in_total(store: Store) -> None:
    feb_28, mar_30, mar_31, apr_1 = utc(2026, 2, 28), utc(2026, 3, 30), utc(2026, 3, 31, 23), utc(2026, 4, 1, 0)
    await submit(store, new_job("job_feb", shots=10, estimate_micro_usd=1_000), now=feb_28)
    await run_to(store, "job_feb", JobState.SUCCEEDED, feb_28)
    await submit(store, new_job("job_mar_30", estimate_micro_usd=20_000), now=mar_30)
    await run_to(store, "job_mar_30", JobState.SUCCEEDED, mar_31, actual_cost_micro_usd=15_000, actual_qpu_seconds=1.0)
    await submit(store, new_job("job_mar_31", shots=1_000, estimate_micro_usd=300_000), now=mar_31)
    await submit(store, new_job("job_cancelled", estimate_micro_usd=4_000_000), now=mar_31)
    await store.transition("job_cancelled", JobState.CANCELLED, mar_31)
    await submit(store, new_job("job_bobs", agent="bob", shots=7, estimate_micro_usd=50), now=mar_31)

    # A reservation counts in the day and month it was made (UTC); a commitment keeps that day.
    assert await store.ledger_totals("agent", "alice", mar_31) == LedgerTotals(
        committed={"day": (0, 0, 0), "month": (15_000, 100, 1_000), "total": (16_000, 110, 1_000)},
        reserved={"day": (300_000, 1_000, 0), "month": (300_000, 1_000, 0), "total": (300_000, 1_000, 0)},
        queued_jobs=1,
        running_jobs=0,
    )
    # A new day and a new month start from zero; the total carries over.
    on_apr_1 = await store.ledger_totals("agent", "alice", apr_1)
    assert on_apr_1.committed == {"day": (0, 0, 0), "month": (0, 0, 0), "total": (16_000, 110, 1_000)}
    assert on_apr_1.reserved == {"day": (0, 0, 0), "month": (0, 0, 0), "total": (300_000, 1_000, 0)}
    # The project adds up all its agents.
    project = await store.ledger_totals("project", "default", mar_31)
    assert project.reserved["day"] == (300_050, 1_007, 0)
    assert (project.queued_jobs, project.running_jobs) == (2, 0)
    assert await store.ledger_totals("agent", "nobody", mar_31) == LedgerTotals({}, {}, 0, 0)


# -- simulate-first and approvals ----------------------------------------------------------------------


async def test_has_simulation_needs_a_succeeded_simulator_run_of_that_circuit_in_that_project(store: Store) -> None:
    simulated, on_hardware, failed, waiting = "a" * 64, "b" * 64, "c" * 64, "d" * 64
    await submit(store, new_job("job_sim", project="lab", fingerprint=simulated))
    await run_to(store, "job_sim", JobState.SUCCEEDED, T0 + 1)
    await submit(store, new_job("job_hw", project="lab", fingerprint=on_hardware, simulator=False, backend="ibm/x"))
    await run_to(store, "job_hw", JobState.SUCCEEDED, T0 + 1)
    await submit(store, new_job("job_failed", project="lab", fingerprint=failed))
    await run_to(store, "job_failed", JobState.FAILED, T0 + 1)
    await submit(store, new_job("job_waiting", project="lab", fingerprint=waiting))

    assert await store.has_simulation("lab", simulated) is True
    assert await store.has_simulation("other-lab", simulated) is False
    for fingerprint in (on_hardware, failed, waiting):
        assert await store.has_simulation("lab", fingerprint) is False


async def test_expired_approvals_lists_pending_jobs_past_their_expiry_and_expiring_one_releases_it(
    store: Store, database: Database
) -> None:
    await submit(store, new_job("job_soon", state=JobState.PENDING_APPROVAL, approval_expires_at=T0 + 100))
    await submit(store, new_job("job_later", state=JobState.PENDING_APPROVAL, approval_expires_at=T0 + 500))
    await submit(store, new_job("job_approved", state=JobState.PENDING_APPROVAL, approval_expires_at=T0 + 50))
    await store.transition("job_approved", JobState.QUEUED, T0 + 10, fields={"approved_by": "operator root"})

    assert [job.id for job in await store.pending_approvals()] == ["job_soon", "job_later"]
    assert await store.expired_approvals(T0 + 100) == []  # at its expiry it still waits
    assert await store.expired_approvals(T0 + 101) == ["job_soon"]
    assert await store.expired_approvals(T0 + 1_000) == ["job_soon", "job_later"]

    await store.transition("job_soon", JobState.EXPIRED, T0 + 101)

    assert await store.expired_approvals(T0 + 1_000) == ["job_later"]
    assert ledger_row(database, "job_soon")[0] == "released"
    assert ledger_row(database, "job_approved")[0] == "reserved"


# -- claim order: priority first, then round-robin between agents --------------------------------------


async def claim_all(store: Store) -> list[str]:
    """Claim until nothing is left, one second apart; the ids in the order they were served."""
    order: list[str] = []
    while (job := await store.claim(["aer"], [], "w", LEASE_S, T0 + len(order))) is not None:
        order.append(job.id)
    return order


async def test_claim_serves_higher_priority_first_and_keeps_queue_order_within_a_priority(store: Store) -> None:
    await submit(store, new_job("job_low", priority=0))
    await submit(store, new_job("job_normal", priority=1))
    await submit(store, new_job("job_high_1", priority=2))
    await submit(store, new_job("job_high_2", priority=2))

    assert await claim_all(store) == ["job_high_1", "job_high_2", "job_normal", "job_low"]


async def test_one_agents_long_queue_does_not_starve_another_agents_single_job(store: Store) -> None:
    for n in range(10):
        await submit(store, new_job(f"job_a{n}", agent="alice"))
    await submit(store, new_job("job_b0", agent="bob"))

    order = await claim_all(store)

    assert order.index("job_b0") == 1, order  # second, right after alice's first; not eleventh
    assert order == ["job_a0", "job_b0", *(f"job_a{n}" for n in range(1, 10))]


async def test_priority_comes_before_fairness_between_agents(store: Store) -> None:
    for n in range(3):
        await submit(store, new_job(f"job_a_high{n}", agent="alice", priority=2))
    await submit(store, new_job("job_b_normal", agent="bob", priority=1))

    assert await claim_all(store) == ["job_a_high0", "job_a_high1", "job_a_high2", "job_b_normal"]


async def test_may_run_holds_back_an_agent_at_its_running_cap_and_sees_running_counts(store: Store) -> None:
    for n in range(3):
        await submit(store, new_job(f"job_a{n}", agent="alice", project="p1"))
    for n in range(2):
        await submit(store, new_job(f"job_b{n}", agent="bob", project="p2"))
    asked: list[tuple[str, int, int]] = []

    def one_at_a_time(job: Candidate, agent_running: int, project_running: int) -> bool:
        asked.append((job.id, agent_running, project_running))
        return agent_running < 1

    first = await store.claim(["aer"], [], "w", LEASE_S, T0, may_run=one_at_a_time)
    second = await store.claim(["aer"], [], "w", LEASE_S, T0 + 1, may_run=one_at_a_time)
    asked.clear()
    third = await store.claim(["aer"], [], "w", LEASE_S, T0 + 2, may_run=one_at_a_time)

    assert (first and first.id, second and second.id, third) == ("job_a0", "job_b0", None)
    # Each agent was asked about once: after a refusal its other jobs are skipped.
    assert sorted(asked) == [("job_a1", 1, 1), ("job_b1", 1, 1)]

    assert await store.transition("job_a0", JobState.RUNNING, T0 + 3) is not None
    assert await store.transition("job_a0", JobState.SUCCEEDED, T0 + 3) is not None
    freed = await store.claim(["aer"], [], "w", LEASE_S, T0 + 4, may_run=one_at_a_time)
    assert freed is not None and freed.id == "job_a1"


async def test_a_batch_claim_counts_the_jobs_it_took_itself_against_the_running_caps(store: Store) -> None:
    for job_id, agent, project in (
        ("job_a0", "alice", "p1"),
        ("job_a1", "alice", "p1"),
        ("job_c0", "carol", "p1"),
        ("job_d0", "dave", "p1"),
        ("job_b0", "bob", "p2"),
    ):
        await submit(store, new_job(job_id, agent=agent, project=project))

    def caps(job: Candidate, agent_running: int, project_running: int) -> bool:
        return agent_running < 1 and project_running < 2  # one per agent, two per project

    taken = await store.claim_many(["aer"], [], "w", LEASE_S, T0, caps, limit=10)

    # alice's second job waits for her first; dave's for p1, which already runs alice's and carol's
    assert sorted(job.id for job in taken) == ["job_a0", "job_b0", "job_c0"]


async def test_may_run_does_not_hold_back_a_job_whose_worker_stopped_heartbeating(store: Store) -> None:
    await submit(store, new_job("job_orphan"))
    await store.claim(["aer"], [], "worker-a", LEASE_S, T0)

    taken = await store.claim(["aer"], [], "worker-b", LEASE_S, T0 + LEASE_S + 1, may_run=lambda job, a, p: False)

    assert taken is not None and (taken.id, taken.lease_owner) == ("job_orphan", "worker-b")


async def test_an_agent_at_its_running_cap_with_a_long_queue_does_not_block_other_agents(store: Store) -> None:
    for n in range(70):
        await submit(store, new_job(f"job_a{n:02d}", agent="alice"))
    await submit(store, new_job("job_b0", agent="bob"))

    taken = await store.claim(["aer"], [], "w", LEASE_S, T0, may_run=lambda job, a, p: job.agent != "alice")

    assert taken is not None and taken.id == "job_b0"


async def test_the_jobs_table_holds_the_record_fields_in_order_so_rows_decode_by_position(
    store: Store, database: Database
) -> None:
    from dataclasses import fields

    await submit(store, new_job("job_1", name="n"))
    if database.is_postgres:  # the same columns in the same order, so `db copy` and readers see one schema
        with psycopg.connect(database.url or "") as conn:
            cursor = conn.execute("SELECT * FROM jobs")
            assert [c.name for c in cursor.description or ()] == [field.name for field in fields(JobRecord)]
        return
    assert database.path is not None
    with closing(sqlite3.connect(database.path)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs").fetchone()
    assert row.keys() == [field.name for field in fields(JobRecord)]
    # By position (a whole row) and by name (a mapping) decode the same.
    assert JobRecord.from_row(row) == JobRecord.from_row(dict(row))


# -- processes sharing the database ------------------------------------------------------------------


def report(process_id: str, seen_at: float, policy: str | None = "a" * 64) -> ProcessReport:
    return ProcessReport(process_id, "host", 1, "http 127.0.0.1:1", T0, seen_at, "/p.toml", policy, None, None)


async def test_each_process_report_replaces_its_last_and_silent_processes_drop_out(
    store: Store, other_store: Store
) -> None:
    await store.report_process(report("one", T0))
    await other_store.report_process(report("two", T0 + 1))
    await store.report_process(report("one", T0 + 20, policy="b" * 64))

    assert [(r.id, r.policy_sha256) for r in await other_store.processes(T0 - 1)] == [
        ("one", "b" * 64),
        ("two", "a" * 64),
    ]
    assert [r.id for r in await store.processes(T0 + 5)] == ["one"]  # "two" has not reported since T0 + 1
    await store.forget_process("one")
    assert await other_store.processes(T0 - 1) == [report("two", T0 + 1)]


async def test_a_shared_secret_is_the_first_processes_and_every_process_gets_it(
    store: Store, other_store: Store
) -> None:
    first = await store.shared_secret("request_state", b"1" * 32)
    again = await other_store.shared_secret("request_state", b"2" * 32)

    assert first == again == b"1" * 32
    assert await other_store.shared_secret("another", b"3" * 32) == b"3" * 32


# -- the console's operators and sessions --------------------------------------------------------


async def test_an_operator_is_stored_once_with_its_audit_row_and_disabling_ends_its_sessions(store: Store) -> None:
    olga = OperatorRecord("olga", "approver", "scrypt$1$1$1$00$00", T0)
    act = AuditEntry(tool="operators.create", decision="ok", operator="root")

    assert await store.insert_operator(olga, act) is True
    assert await store.insert_operator(OperatorRecord("olga", "admin", "x", T0), act) is False  # name taken
    await store.start_session(SessionRecord("a" * 64, "olga", T0, T0), idle_before=T0 - 1800)
    await store.start_session(SessionRecord("b" * 64, "olga", T0 + 5, T0 + 5), idle_before=T0 - 1800)
    found = await store.session("a" * 64)
    await store.touch_session("a" * 64, T0 + 60)
    touched = await store.session("a" * 64)

    assert found == (SessionRecord("a" * 64, "olga", T0, T0), olga)
    assert touched is not None and touched[0].seen_at == T0 + 60
    assert await store.list_operators() == [olga]

    off = AuditEntry(tool="operators.disable", decision="ok", operator="root")
    assert await store.disable_operator("olga", T0 + 100, off) is True
    assert await store.disable_operator("olga", T0 + 200, off) is False  # once only
    assert await store.session("a" * 64) is None and await store.session("b" * 64) is None
    assert (await store.operator("olga")) == OperatorRecord("olga", "approver", "scrypt$1$1$1$00$00", T0, T0 + 100)
    assert [r.tool for r in await store.audit_tail(limit=10)] == ["operators.create", "operators.disable"]


async def test_a_new_session_sweeps_idle_ones_and_an_ended_one_is_gone(store: Store) -> None:
    await store.insert_operator(
        OperatorRecord("ann", "viewer", "h", T0), AuditEntry(tool="operators.create", decision="ok")
    )
    await store.start_session(SessionRecord("c" * 64, "ann", T0, T0), idle_before=T0 - 1800)
    await store.start_session(SessionRecord("d" * 64, "ann", T0 + 3600, T0 + 3600), idle_before=T0 + 1800)
    await store.end_session("d" * 64)

    assert await store.session("c" * 64) is None  # idle for an hour: swept
    assert await store.session("d" * 64) is None  # signed out
    assert await store.session(INJECTION) is None
