"""The SQLite store on a real file: migrations, the durable queue's leases, the audit log, and listings."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from qpu_gateway.jobs import JobState
from qpu_gateway.records import AuditEntry, JobRecord, KeyRecord, NewJob, StateUsage
from qpu_gateway.sqlite_store import SqliteStore
from qpu_gateway.store import Store, open_store

from .support import BELL2, BELL3

pytestmark = pytest.mark.anyio

T0 = 1_000.0  # the store takes time as an argument, so leases are tested without sleeping
LEASE_S = 30.0
INJECTION = "x'); DROP TABLE jobs;--"


def new_job(
    job_id: str,
    *,
    agent: str = "alice",
    project: str = "default",
    name: str | None = None,
    backend: str = "aer/simulator",
    shots: int = 100,
    circuits: int = 1,
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
        fingerprint="f" * 64,
        estimate_micro_usd=0,
        state=JobState.QUEUED,
    )


def admission(job: NewJob) -> AuditEntry:
    return AuditEntry(tool="submit_job", decision="ok", agent=job.agent, project=job.project, job_id=job.id)


async def submit(store: Store, job: NewJob, now: float = T0) -> JobRecord:
    return await store.insert_job(job, admission(job), now)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "g.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(db_path)
    yield opened
    await opened.close()


@pytest.fixture
async def other_store(db_path: Path, store: Store) -> AsyncIterator[Store]:
    """A second connection to the same file, as a second gateway process would hold."""
    opened = await open_store(db_path)
    yield opened
    await opened.close()


# -- migrations ---------------------------------------------------------------------------------------


async def test_migrating_twice_applies_nothing_the_second_time(db_path: Path) -> None:
    store = await SqliteStore.open(db_path)
    try:
        assert await store.migrate() == ["0001_core.sql"]
        assert await store.migrate() == []
    finally:
        await store.close()

    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT name FROM schema_migrations").fetchall() == [("0001_core.sql",)]


async def test_reopening_a_migrated_file_keeps_its_rows(db_path: Path) -> None:
    first = await open_store(db_path)
    await submit(first, new_job("job_kept"))
    await first.close()

    second = await open_store(db_path)
    try:
        assert await second.migrate() == []
        kept = await second.get_job("job_kept")
    finally:
        await second.close()
    assert kept is not None and kept.state is JobState.QUEUED


async def test_two_stores_migrating_one_new_file_at_once_both_succeed_and_apply_it_once(db_path: Path) -> None:
    stores = [await SqliteStore.open(db_path), await SqliteStore.open(db_path)]
    applied: list[list[str]] = []

    async def migrate(store: SqliteStore) -> None:
        applied.append(await store.migrate())

    try:
        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(migrate, store)
    finally:
        for store in stores:
            await store.close()

    assert sorted(applied) == [[], ["0001_core.sql"]]


async def test_several_processes_opening_a_new_file_at_once_all_get_a_working_store(db_path: Path) -> None:
    opened: list[Store] = []

    async def open_one() -> None:
        opened.append(await open_store(db_path))

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
            await anyio.sleep(0.005)  # a worker does some work between claims

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

    # Well before worker-b's lease ends, a new worker picks up both handed-back jobs at once.
    first = await store.claim(["aer"], [], "worker-c", LEASE_S, T0 + 2)
    second = await store.claim(["aer"], [], "worker-c", LEASE_S, T0 + 2)
    assert first is not None and second is not None
    assert (first.id, first.state) == ("job_unsent", JobState.SUBMITTING)
    assert (second.id, second.state, second.provider_ref) == ("job_sent", JobState.RUNNING, "prov-9")
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


async def test_a_transition_cannot_set_columns_outside_its_list(store: Store) -> None:
    await submit(store, new_job("job_1"))

    for column in ("agent", "state = 'succeeded', agent", "shots"):
        with pytest.raises(ValueError, match="transition cannot set"):
            await store.transition("job_1", JobState.CANCELLED, T0, fields={column: "mallory"})

    job = await store.get_job("job_1")
    assert job is not None and (job.agent, job.state) == ("alice", JobState.QUEUED)


async def test_the_audit_log_refuses_updates_and_deletes(store: Store, db_path: Path) -> None:
    await store.append_audit(AuditEntry(tool="list_jobs", decision="ok", agent="alice", detail="first"), T0)

    with closing(sqlite3.connect(db_path)) as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET detail = 'rewritten'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
        db.rollback()

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
    job = new_job("job_hostile", agent=payload, project=payload, name=payload)
    await store.insert_job(job, AuditEntry(tool="submit_job", decision="ok", agent=payload, detail=payload), T0)
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
