"""How the store and the rate-limit storage meet SQLite (server/store/sqlite_thread.py), on real files.

Concurrent writes share transactions; each must still be all or nothing on its own, see the
writes before it in the same transaction, and be withdrawn cleanly when its caller gives up.
Reads and rate-limit hits made on the event loop's thread must step aside, not wait, when the
file is locked. Claims are taken in batches.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path

import aiosqlite
import anyio
import pytest

from qpu_gateway.config import Database
from qpu_gateway.jobs.states import JobState
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.store import Store, StoreError, open_store
from qpu_gateway.store.rate_storage import SqliteRateStorage, storage_uri
from qpu_gateway.store.records import AdmissionFacts, AuditEntry
from qpu_gateway.store.sqlite_thread import Busy, GroupWriter

from .test_store import LEASE_S, LOOP_WINDOW_S, T0, admission, new_job, row_counts, submit

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(tmp_path / "g.db")
    yield opened
    await opened.close()


@pytest.fixture
async def table(tmp_path: Path) -> AsyncIterator[tuple[aiosqlite.Connection, Path]]:
    """A bare connection with one table, for the group writer on its own."""
    path = tmp_path / "w.db"
    conn = await aiosqlite.connect(str(path), isolation_level=None)
    await conn.execute("PRAGMA journal_mode = WAL")
    await conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY)")
    yield conn, path
    await conn.close()


def rows(path: Path) -> list[int]:
    with closing(sqlite3.connect(path)) as db:
        return [n for (n,) in db.execute("SELECT n FROM t ORDER BY n")]


async def test_concurrent_writes_share_transactions_and_a_failing_one_is_rolled_back_alone(
    table: tuple[aiosqlite.Connection, Path],
) -> None:
    conn, path = table
    writer = GroupWriter(conn, threading.Lock(), patience_s=5.0)
    # A connection of its own sees only committed rows; a write that finds more rows in its own
    # transaction than that, besides its own, shares the transaction with writes not yet committed.
    committed_view = sqlite3.connect(path, check_same_thread=False)
    shared: list[bool] = []
    outcomes: dict[int, str] = {}

    def insert(n: int) -> Callable[[sqlite3.Connection], int]:
        def work(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO t (n) VALUES (?)", (n,))
            if n % 10 == 3:
                db.execute("INSERT INTO t (n) VALUES (?)", (n,))  # a primary-key clash: this write fails
            (mine,) = db.execute("SELECT count(*) FROM t").fetchone()
            (theirs,) = committed_view.execute("SELECT count(*) FROM t").fetchone()
            shared.append(mine > theirs + 1)
            return n

        return work

    async def one(n: int) -> None:
        try:
            outcomes[n] = f"ok {await writer.run(insert(n))}"
        except sqlite3.IntegrityError:
            outcomes[n] = "failed"

    try:
        async with anyio.create_task_group() as tg:
            for n in range(100):
                tg.start_soon(one, n)
    finally:
        committed_view.close()

    failed = {n for n in range(100) if n % 10 == 3}
    assert {n for n, what in outcomes.items() if what == "failed"} == failed
    assert all(outcomes[n] == f"ok {n}" for n in set(range(100)) - failed)
    # Neither half of a failed write is kept, and every other write is.
    assert rows(path) == sorted(set(range(100)) - failed)
    assert any(shared), "100 writes at once should have shared at least one transaction"


async def test_a_write_that_cannot_start_within_its_patience_is_withdrawn_and_never_runs(
    table: tuple[aiosqlite.Connection, Path],
) -> None:
    conn, path = table
    # Another process holds the write lock for longer than the writer's patience.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    await conn.execute("PRAGMA busy_timeout = 1500")
    writer = GroupWriter(conn, threading.Lock(), patience_s=0.5)
    ran: list[int] = []

    def work(n: int) -> Callable[[sqlite3.Connection], None]:
        def insert(db: sqlite3.Connection) -> None:
            ran.append(n)
            db.execute("INSERT INTO t (n) VALUES (?)", (n,))

        return insert

    results: dict[int, str] = {}

    async def one(n: int) -> None:
        try:
            await writer.run(work(n))
            results[n] = "written"
        except Busy:
            results[n] = "withdrawn"
        except sqlite3.OperationalError:
            results[n] = "locked"

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 1)
        await anyio.sleep(0.1)  # the first write's group is waiting on SQLite's busy handler
        tg.start_soon(one, 2)
    holder.execute("ROLLBACK")
    holder.close()
    # The first began (its transaction met the lock, was refused as locked); the second never began.
    assert results == {1: "locked", 2: "withdrawn"}
    assert 2 not in ran
    assert rows(path) == []
    # The writer still works afterwards.
    await writer.run(work(3))
    assert rows(path) == [3]


async def test_concurrent_admissions_each_decide_on_the_reservations_committed_or_grouped_before_them(
    store: Store, tmp_path: Path
) -> None:
    budget, price = 1_000_000, 100_000  # room for exactly 10 jobs

    def decide(facts: AdmissionFacts) -> Refusal | None:
        spent = facts.agent.reserved.get("total", (0, 0, 0))[0] + facts.agent.committed.get("total", (0, 0, 0))[0]
        if spent + price > budget:
            return Refusal(code="quota_exhausted", message="over budget", rule="test")
        return None

    outcomes: list[bool] = []

    async def one(n: int) -> None:
        job = new_job(f"job_{n:03d}", estimate_micro_usd=price, fingerprint=f"{n:064d}")
        outcome = await store.admit(job, admission(job), T0, loop_window_s=LOOP_WINDOW_S, decide=decide)
        outcomes.append(not isinstance(outcome, Refusal))

    async with anyio.create_task_group() as tg:
        for n in range(60):
            tg.start_soon(one, n)

    assert outcomes.count(True) == 10
    assert row_counts(Database(path=tmp_path / "g.db")) == {"jobs": 10, "ledger": 10, "audit": 10}
    audit = await store.audit_tail(limit=100)
    assert [row.seq for row in audit] == list(range(1, 11))
    assert all(row.prev_hash == before.row_hash for before, row in itertools.pairwise(audit)), "one unbroken chain"


async def test_a_failing_store_write_reports_its_error_without_undoing_the_others_in_its_group(store: Store) -> None:
    await submit(store, new_job("job_1"))

    async def ok_write(n: int) -> None:
        await store.append_audit(AuditEntry(tool=f"t{n}", decision="ok"), T0)

    async def bad_transition() -> None:
        with pytest.raises(ValueError, match="cannot set"):
            await store.transition("job_1", JobState.FAILED, T0, fields={"state": "x"})

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(ok_write, n)
        tg.start_soon(bad_transition)
    tools = [row.tool for row in await store.audit_tail(limit=100)]
    assert sorted(tools[1:]) == sorted(f"t{n}" for n in range(20))


async def test_claim_many_takes_a_batch_in_one_call_within_each_backends_room(store: Store) -> None:
    for n in range(10):
        await submit(store, new_job(f"sim_{n}", backend="aer/simulator"))
    for n in range(3):
        await submit(store, new_job(f"other_{n}", backend="aer/other"))

    room = {"aer/simulator": 4, "aer/other": 1}
    taken = await store.claim_many(["aer"], [], "w", LEASE_S, T0, limit=32, room=room.__getitem__)

    by_backend = sorted(job.backend for job in taken)
    assert by_backend == ["aer/other"] + ["aer/simulator"] * 4
    assert all(job.state is JobState.SUBMITTING and job.lease_owner == "w" for job in taken)
    claimed = [row for row in await store.audit_tail(limit=100) if row.tool == "job.claimed"]
    assert len(claimed) == 5
    # The limit caps the batch; nothing is claimed twice.
    more = await store.claim_many(["aer"], ["aer/other"], "w", LEASE_S, T0, limit=3)
    assert len(more) == 3 and not {job.id for job in more} & {job.id for job in taken}


async def test_a_store_busy_past_its_patience_refuses_with_busy_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QPU_GATEWAY_BUSY_TIMEOUT_S", "0.5")
    opened = await open_store(tmp_path / "b.db")
    try:
        holder = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StoreError) as refused:
                await opened.append_audit(AuditEntry(tool="x", decision="ok"), T0)
            assert refused.value.retry_after_s == 1.0
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert await opened.audit_tail(limit=10) == []
        await opened.append_audit(AuditEntry(tool="y", decision="ok"), T0)
        assert [row.tool for row in await opened.audit_tail(limit=10)] == ["y"]
    finally:
        await opened.close()


async def test_agents_still_take_turns_within_one_batch_of_claims(store: Store) -> None:
    for n in range(4):
        await submit(store, new_job(f"alice_{n}", agent="alice", fingerprint=f"{n:064d}"))
    await submit(store, new_job("bob_0", agent="bob"))

    taken = await store.claim_many(["aer"], [], "w", LEASE_S, T0, limit=5)

    assert [job.id for job in taken] == ["alice_0", "bob_0", "alice_1", "alice_2", "alice_3"]


async def test_a_read_that_cannot_use_the_event_loops_connection_goes_to_the_readers_thread(store: Store) -> None:
    await submit(store, new_job("job_1"))

    def from_another_thread() -> str | None:
        # sqlite3 refuses a connection made on another thread; the read must still be answered.
        job = anyio.run(store.get_job, "job_1")
        return job.id if job is not None else None

    assert await anyio.to_thread.run_sync(from_another_thread) == "job_1"


async def test_a_rate_limit_hit_made_while_the_file_is_locked_waits_for_it_and_counts_once(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    storage = SqliteRateStorage(storage_uri(path))
    try:
        assert await storage.acquire_entry("k", limit=2, expiry=60)  # opens and takes the quick path
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        async with anyio.create_task_group() as tg:
            outcome: list[bool] = []

            async def hit() -> None:
                outcome.append(await storage.acquire_entry("k", limit=2, expiry=60))

            tg.start_soon(hit)
            await anyio.sleep(0.3)
            assert outcome == [], "the hit must wait for the lock, not be refused or counted around it"
            holder.execute("COMMIT")
        holder.close()
        assert outcome == [True]
        assert not await storage.acquire_entry("k", limit=2, expiry=60)  # exactly two counted
        assert (await storage.get_moving_window("k", limit=2, expiry=60))[1] == 2
    finally:
        await storage.aclose()


async def test_a_claim_on_an_empty_queue_takes_no_write_lock(store: Store, tmp_path: Path) -> None:
    # Every process polls the queue twice a second; while another holds the write lock, an idle
    # poll must neither wait for it nor be refused as busy.
    holder = sqlite3.connect(tmp_path / "g.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with anyio.fail_after(1):
            assert await store.claim_many(["aer"], [], "w", LEASE_S, T0, limit=32) == []
    finally:
        holder.execute("ROLLBACK")
        holder.close()
