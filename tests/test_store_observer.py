"""The store's observer hook: each store call reports the statements it ran and its round trips.

What `bench/statements.py` counts per job rests on these reports, so they are checked here
statement by statement on a real SQLite file: which statements each call of the job path runs
(transaction control included), and that the audit chain those single-statement rows build
still verifies.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import limits
import pytest
from limits.aio.strategies import MovingWindowRateLimiter

from qpu_gateway.audit.chain import ChainVerifier
from qpu_gateway.errors import RateLimited
from qpu_gateway.jobs.ratelimit import RateLimiter
from qpu_gateway.jobs.states import JobState
from qpu_gateway.keys import Principal
from qpu_gateway.policy.file import RateRule
from qpu_gateway.store import observer, open_store
from qpu_gateway.store.observer import RoundTrip
from qpu_gateway.store.rate_storage import SqliteRateStorage, storage_uri
from qpu_gateway.store.records import AuditEntry, Candidate

from .test_store import LEASE_S, T0, new_job, submit

pytestmark = pytest.mark.anyio


def verb(sql: str) -> str:
    """`INSERT INTO audit`, `UPDATE jobs`, `SELECT`, `BEGIN IMMEDIATE`: what a statement does, and to what."""
    words = sql.split()
    if words[0] == "INSERT":
        return " ".join(words[:3])
    if words[0] in ("UPDATE", "DELETE", "BEGIN"):
        return " ".join(words[:2] if words[0] != "DELETE" else words[:3])
    return words[0]


class Recorder:
    """An observer that keeps every report, in order (reports come from several threads)."""

    def __init__(self) -> None:
        self.statements: list[tuple[str | None, str]] = []
        self.round_trips: list[tuple[str | None, RoundTrip]] = []
        self._lock = threading.Lock()

    def statement(self, operation: str | None, sql: str) -> None:
        with self._lock:
            self.statements.append((operation, verb(sql)))

    def round_trip(self, operation: str | None, kind: RoundTrip) -> None:
        with self._lock:
            self.round_trips.append((operation, kind))

    def take(self) -> tuple[list[tuple[str | None, str]], list[tuple[str | None, RoundTrip]]]:
        """Everything reported since the last take."""
        with self._lock:
            taken = (self.statements, self.round_trips)
            self.statements, self.round_trips = [], []
        return taken


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    watching = Recorder()
    observer.install(watching)
    yield watching
    observer.install(None)


def one_at_most(job: Candidate, agent_running: int, project_running: int) -> bool:
    return agent_running < 1


async def test_each_call_of_a_jobs_path_reports_its_own_statements_and_round_trips(
    tmp_path: Path, recorder: Recorder
) -> None:
    store = await open_store(tmp_path / "gateway.db")
    try:
        recorder.take()  # opening and migrating

        await submit(store, new_job("job_1"))
        assert recorder.take() == (
            [
                ("admit", "BEGIN IMMEDIATE"),
                ("admit", "SELECT"),  # every fact admission decides on, in one statement
                ("admit", "INSERT INTO jobs"),  # with its reservation (the `ledger` columns)
                ("admit", "INSERT INTO audit"),  # seq, link and hash inside the INSERT
                ("admit", "COMMIT"),
            ],
            [("admit", "hop")],
        )

        claimed = await store.claim_many(["aer"], [], "w1", LEASE_S, T0 + 1, one_at_most, limit=32)
        assert [job.id for job in claimed] == ["job_1"]
        assert recorder.take() == (
            [
                # no "anything claimable?" read first: this store has just queued a job itself
                ("claim_many", "BEGIN IMMEDIATE"),
                # the candidates, read once (job_1 was the only one), with the running counts
                # may_run judges by and the agents' turns
                ("claim_many", "SELECT"),
                ("claim_many", "UPDATE jobs"),
                ("claim_many", "INSERT INTO agent_turns"),  # alice's first turn
                ("claim_many", "INSERT INTO audit"),
                ("claim_many", "COMMIT"),
            ],
            [("claim_many", "hop")],
        )

        await store.transition("job_1", JobState.SUCCEEDED, T0 + 2, owner="w1", fields={"result": [{"c": {"00": 1}}]})
        assert recorder.take() == (
            [
                ("transition", "BEGIN IMMEDIATE"),
                ("transition", "UPDATE jobs"),  # the reservation settled in the same UPDATE
                ("transition", "INSERT INTO audit"),
                ("transition", "COMMIT"),
            ],
            [("transition", "hop")],
        )

        await store.append_audit(AuditEntry(tool="get_job", decision="ok", agent="alice"), T0 + 3)
        # a single statement alone needs no transaction of its own
        assert recorder.take() == ([("append_audit", "INSERT INTO audit")], [("append_audit", "hop")])

        job = await store.get_job("job_1")
        assert job is not None and job.state is JobState.SUCCEEDED
        # read on the event loop's own thread: a direct call, no hop
        assert recorder.take() == ([("get_job", "SELECT")], [("get_job", "direct")])

        assert await store.claim_many(["aer"], [], "w1", LEASE_S, T0 + 4, one_at_most, limit=32) == []
        # an idle poll reads, and takes no write lock
        assert recorder.take() == ([("claim_many", "SELECT")], [("claim_many", "direct")])

        verifier = ChainVerifier()
        async for page in store.audit_pages():
            verifier.feed(page)
        report = verifier.finish(await store.audit_highest_seq())
        assert report.intact and report.rows == 4
    finally:
        await store.close()


async def test_a_claim_writes_its_agents_turn_only_when_another_agent_holds_the_latest_turn(
    tmp_path: Path, recorder: Recorder
) -> None:
    store = await open_store(tmp_path / "gateway.db")
    try:
        for job_id, agent in (("job_a1", "alice"), ("job_a2", "alice"), ("job_b1", "bob"), ("job_a3", "alice")):
            await submit(store, new_job(job_id, agent=agent))
        recorder.take()

        served: list[str | None] = []
        wrote_turn: list[bool] = []
        for n in range(4):
            job = await store.claim(["aer"], [], "w1", LEASE_S, T0 + n, one_at_most)
            served.append(job and job.id)
            wrote_turn.append(("claim", "INSERT INTO agent_turns") in recorder.take()[0])
            if job is not None:
                assert await store.transition(job.id, JobState.SUCCEEDED, T0 + n, owner="w1") is not None
                recorder.take()

        # alice first (nobody has a turn yet), bob (none yet), then alice, whose turn is older than bob's
        assert served == ["job_a1", "job_b1", "job_a2", "job_a3"]
        # alice's and bob's first turns, alice's after bob's; alice's last claim found her alone in
        # the latest turn, so her place in the rotation stayed as it was without a write
        assert wrote_turn == [True, True, True, False]
    finally:
        await store.close()


async def test_a_rate_limit_hit_is_one_statement_once_its_key_was_pruned_in_this_window(
    tmp_path: Path, recorder: Recorder
) -> None:
    storage = SqliteRateStorage(storage_uri(tmp_path / "gateway.db"))
    try:
        assert await storage.acquire_entry("agent:alice", 2, 60)
        first, _ = recorder.take()
        assert first[-5:] == [
            ("rate_limit.acquire_entry", "BEGIN IMMEDIATE"),
            ("rate_limit.acquire_entry", "DELETE FROM rate_hits"),  # every key's expired hits, once a minute
            ("rate_limit.acquire_entry", "DELETE FROM rate_hits"),  # this key's left-behind hits
            ("rate_limit.acquire_entry", "INSERT INTO rate_hits"),
            ("rate_limit.acquire_entry", "COMMIT"),
        ]

        assert await storage.acquire_entry("agent:alice", 2, 60)
        assert not await storage.acquire_entry("agent:alice", 2, 60)  # the window is full: nothing added
        statements, round_trips = recorder.take()
        assert statements == [("rate_limit.acquire_entry", "INSERT INTO rate_hits")] * 2
        assert round_trips == [("rate_limit.acquire_entry", "direct")] * 2
        _, used = await storage.get_moving_window("agent:alice", 2, 60)
        assert used == 2
    finally:
        await storage.aclose()


async def test_a_call_counted_against_two_rules_is_one_statement_with_the_outcome_of_one_by_one(
    tmp_path: Path, recorder: Recorder
) -> None:
    """The gateway's limiter hits both of submit_job's rules in one statement; when the second has no
    room, the first stays counted and the refusal names the second, as hitting them in turn did."""
    limiter = RateLimiter(storage_uri(tmp_path / "gateway.db"))
    rules = [
        RateRule(limit="5/minute", per="agent", tools=("submit_job",)),
        RateRule(limit="2/second", per="agent", tools=("*",)),
    ]
    who = Principal(agent="alice", project="p", scopes=frozenset(), key_id="k1")
    minute = MovingWindowRateLimiter(limiter.storage)
    try:
        await limiter.enforce(rules, who, backend=None)  # opens the storage and prunes: not counted below
        recorder.take()
        await limiter.enforce(rules, who, backend=None)
        statements, _ = recorder.take()
        assert statements == [("rate_limit.acquire_entries", "INSERT INTO rate_hits")]

        with pytest.raises(RateLimited, match="rule agent:\\*:calls:2/second"):
            await limiter.enforce(rules, who, backend=None)
        stats = await minute.get_window_stats(limits.parse("5/minute"), "qpu", rules[0].id, "agent:alice")
        assert stats.remaining == 2  # three calls reached the per-minute rule, the refused one included
        # Known spent now: refused from the limiter's memory, with the first rule counted as before.
        with pytest.raises(RateLimited):
            await limiter.enforce(rules, who, backend=None)
        stats = await minute.get_window_stats(limits.parse("5/minute"), "qpu", rules[0].id, "agent:alice")
        assert stats.remaining == 1

        # A rule in wait mode still waits for its room (after the one statement found none).
        waiting = [rules[0].model_copy(update={"limit": "50/minute"}), rules[1].model_copy(update={"mode": "wait"})]
        await limiter.enforce(waiting, who, backend=None)
    finally:
        await limiter.aclose()


async def test_connections_opened_before_an_observer_is_installed_report_no_statements(tmp_path: Path) -> None:
    store = await open_store(tmp_path / "gateway.db")
    watching = Recorder()
    observer.install(watching)
    try:
        assert await store.get_job("job_none") is None
    finally:
        observer.install(None)
        await store.close()

    assert watching.take() == ([], [("get_job", "direct")])
