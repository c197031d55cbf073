"""The tamper-evident audit log: a real gateway's rows verify, and edits made in the file are caught.

Tampering happens the way someone holding the database file would do it: open it with the
sqlite3 module, drop the append-only triggers, change rows, put the triggers back.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import anyio
import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.store import open_store
from qpu_gateway.store.records import AuditEntry

from .support import BELL2, gateway_cmd, in_memory

pytestmark = pytest.mark.anyio

TRIGGERS = """
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def cli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPU_GATEWAY_")}
    return subprocess.run(
        gateway_cmd(*args, "--db", str(db)), env=env, capture_output=True, text=True, timeout=120, check=False
    )


async def acli(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, without blocking the gateway running in this event loop."""
    return await anyio.to_thread.run_sync(lambda: cli(db, *args))


@contextmanager
def tampering(db: Path) -> Iterator[sqlite3.Connection]:
    """The file opened by an attacker: triggers dropped for the edit, recreated afterwards."""
    with closing(sqlite3.connect(db, timeout=30)) as conn:
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("DROP TRIGGER audit_no_delete")
        yield conn
        conn.executescript(TRIGGERS)
        conn.commit()


def seqs(db: Path) -> list[int]:
    with closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("SELECT seq FROM audit ORDER BY seq")]


async def append(db: Path, count: int, *, at: float | None = None, tool: str = "list_jobs") -> None:
    store = await open_store(db)
    try:
        for n in range(count):
            when = time.time() if at is None else at + n
            await store.append_audit(AuditEntry(tool=tool, decision="ok", agent="alice", detail=f"row {n}"), when)
    finally:
        await store.close()


@pytest.fixture
async def session_log(gateway: Gateway, alice_key: str, config: Config) -> Path:
    """The audit rows of a real agent session: tool calls, a refusal, and a job run to the end."""
    async with in_memory(gateway, alice_key) as client:
        await client.call_tool("list_backends", {})
        await client.call_tool("estimate_job", {"circuit": BELL2, "shots": 100})
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100})
        assert submitted.structured_content is not None
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
        assert done.structured_content is not None and done.structured_content["state"] == "succeeded"
        await client.call_tool("get_job", {"job_id": "job_00000000000000000000"})  # refused: not_found
        await client.call_tool("get_usage", {})
    assert len(seqs(config.db_path)) >= 8
    return config.db_path


# -- an untouched log --------------------------------------------------------------------------


async def test_a_real_sessions_audit_rows_form_an_intact_chain(session_log: Path) -> None:
    rows = seqs(session_log)

    done = await acli(session_log, "audit", "verify")

    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{len(rows)} rows, chain intact"
    assert lines[1].startswith(f"head {rows[-1]}:")
    with closing(sqlite3.connect(session_log)) as conn:
        tools = {row[0] for row in conn.execute("SELECT tool FROM audit")}
        unhashed = conn.execute("SELECT count(*) FROM audit WHERE row_hash IS NULL").fetchone()[0]
    assert {"submit_job", "job.claimed", "job.succeeded", "get_job"} <= tools
    assert unhashed == 0


def test_a_fresh_database_verifies_with_no_rows(tmp_path: Path) -> None:
    anyio.run(append, tmp_path / "gateway.db", 0)

    done = cli(tmp_path / "gateway.db", "audit", "verify")

    assert (done.returncode, done.stdout) == (0, "0 rows, chain intact\n")


# -- tampering ---------------------------------------------------------------------------------


def edit_detail(conn: sqlite3.Connection, rows: list[int]) -> int:
    target = rows[len(rows) // 2]
    conn.execute("UPDATE audit SET detail = 'nothing to see' WHERE seq = ?", (target,))
    return target


def edit_and_rehash_one_row(conn: sqlite3.Connection, rows: list[int]) -> int:
    """A careful attacker recomputes the edited row's own hash: the next row's link gives it away."""
    from qpu_gateway.audit.chain import chain_hash, content_of
    from qpu_gateway.store.records import AuditRecord

    target = rows[len(rows) // 2]
    conn.row_factory = sqlite3.Row
    row = AuditRecord(**dict(conn.execute("SELECT * FROM audit WHERE seq = ?", (target,)).fetchone()))
    forged = AuditRecord(**{**content_of(row), "decision": "refused", "prev_hash": row.prev_hash})
    conn.execute(
        "UPDATE audit SET decision = 'refused', row_hash = ? WHERE seq = ?",
        (chain_hash(row.prev_hash or "", content_of(forged)), target),
    )
    return target + 1


def delete_middle_row(conn: sqlite3.Connection, rows: list[int]) -> int:
    target = rows[len(rows) // 2]
    conn.execute("DELETE FROM audit WHERE seq = ?", (target,))
    return target + 1


def swap_two_rows(conn: sqlite3.Connection, rows: list[int]) -> int:
    """Two neighbours trade places: each keeps its content and hashes but takes the other's seq."""
    first = rows[len(rows) // 2]
    conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (first,))
    conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (first, first + 1))
    conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (first + 1,))
    return first


def swap_two_rows_contents(conn: sqlite3.Connection, rows: list[int]) -> int:
    """Two rows trade their content while the hashes stay where they were."""
    first, second = rows[2], rows[5]
    columns = "at, agent, project, key_id, tool, decision, error_code, args_hash, job_id, detail"
    a = conn.execute(f"SELECT {columns} FROM audit WHERE seq = ?", (first,)).fetchone()
    b = conn.execute(f"SELECT {columns} FROM audit WHERE seq = ?", (second,)).fetchone()
    assignments = ", ".join(f"{c.strip()} = ?" for c in columns.split(","))
    conn.execute(f"UPDATE audit SET {assignments} WHERE seq = ?", (*b, first))
    conn.execute(f"UPDATE audit SET {assignments} WHERE seq = ?", (*a, second))
    return first


def strip_hashes_of_a_row(conn: sqlite3.Connection, rows: list[int]) -> int:
    target = rows[len(rows) // 2]
    conn.execute("UPDATE audit SET prev_hash = NULL, row_hash = NULL WHERE seq = ?", (target,))
    return target


def delete_first_row(conn: sqlite3.Connection, rows: list[int]) -> int:
    conn.execute("DELETE FROM audit WHERE seq = ?", (rows[0],))
    return rows[1]


def delete_last_row(conn: sqlite3.Connection, rows: list[int]) -> int:
    conn.execute("DELETE FROM audit WHERE seq = ?", (rows[-1],))
    return rows[-1]


TAMPERINGS: list[tuple[Callable[[sqlite3.Connection, list[int]], int], str]] = [
    (edit_detail, "content changed"),
    (edit_and_rehash_one_row, "row missing or replaced"),
    (delete_middle_row, "row missing: seq jumps"),
    (swap_two_rows, "rows reordered: the row that belongs at seq {seq} is at seq {next}"),
    (swap_two_rows_contents, "rows reordered"),
    (strip_hashes_of_a_row, "its hashes were removed"),
    (delete_first_row, "row missing: seq jumps from 0"),
    (delete_last_row, "the log ends at seq {prev} but had reached seq {seq}"),
]


@pytest.mark.parametrize(("tamper", "says"), TAMPERINGS, ids=[t.__name__ for t, _ in TAMPERINGS])
async def test_verify_names_the_first_broken_link_after_the_file_is_tampered_with(
    session_log: Path, tamper: Callable[[sqlite3.Connection, list[int]], int], says: str
) -> None:
    with tampering(session_log) as conn:
        broken = tamper(conn, seqs(session_log))

    done = await acli(session_log, "audit", "verify")

    assert done.returncode == 1, done.stdout + done.stderr
    expected = says.format(seq=broken, next=broken + 1, prev=broken - 1)
    assert done.stdout.startswith(f"chain broken at seq {broken}: "), done.stdout
    assert expected in done.stdout
    assert len(done.stdout.splitlines()) == 1


async def test_the_triggers_still_refuse_updates_and_deletes(session_log: Path) -> None:
    with closing(sqlite3.connect(session_log)) as conn:
        for statement in ("UPDATE audit SET row_hash = NULL", "DELETE FROM audit WHERE seq = 1"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                conn.execute(statement)


# -- truncation --------------------------------------------------------------------------------


async def test_a_cut_off_tail_stays_visible_as_a_gap_once_new_rows_arrive(session_log: Path) -> None:
    rows = seqs(session_log)
    with tampering(session_log) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= ?", (rows[-2],))

    await append(session_log, 2)  # the gateway goes on writing: the next seq is not reused

    done = await acli(session_log, "audit", "verify")
    assert done.returncode == 1
    assert done.stdout.startswith(f"chain broken at seq {rows[-1] + 1}: row missing: seq jumps from {rows[-3]}")


async def test_a_truncation_that_also_resets_the_counter_is_caught_only_by_an_anchor(session_log: Path) -> None:
    """The limit of a chain kept in the file itself: a head recorded elsewhere is what catches this."""
    first = await acli(session_log, "audit", "verify")
    head = first.stdout.splitlines()[1].split()[1]
    rows = seqs(session_log)
    with tampering(session_log) as conn:
        conn.execute("DELETE FROM audit WHERE seq = ?", (rows[-1],))
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'audit'", (rows[-2],))

    unanchored = await acli(session_log, "audit", "verify")
    anchored = await acli(session_log, "audit", "verify", "--anchor", head)

    assert unanchored.returncode == 0, "a consistent truncation cannot be seen from the file alone"
    assert anchored.returncode == 1
    assert anchored.stdout == f"chain broken at seq {rows[-1]}: the anchored row seq {rows[-1]} is gone: " + (
        f"the log ends at seq {rows[-2]}\n"
    )


async def test_an_anchor_catches_a_log_rewritten_with_fresh_hashes(session_log: Path) -> None:
    from qpu_gateway.audit.chain import GENESIS, chain_hash, content_of
    from qpu_gateway.store.records import AuditRecord

    head = (await acli(session_log, "audit", "verify")).stdout.splitlines()[1].split()[1]
    with tampering(session_log) as conn:  # rewrite one row and re-chain everything after it
        conn.row_factory = sqlite3.Row
        prev = GENESIS
        for raw in conn.execute("SELECT * FROM audit ORDER BY seq").fetchall():
            row = AuditRecord(**dict(raw))
            content = content_of(row)
            if row.seq == 3:
                content["detail"] = "rewritten"
            digest = chain_hash(prev, content)
            conn.execute(
                "UPDATE audit SET detail = ?, prev_hash = ?, row_hash = ? WHERE seq = ?",
                (content["detail"], prev, digest, row.seq),
            )
            prev = digest

    assert (await acli(session_log, "audit", "verify")).returncode == 0
    anchored = await acli(session_log, "audit", "verify", "--anchor", head)
    assert anchored.returncode == 1
    assert "not the anchored" in anchored.stdout


def test_a_malformed_anchor_is_a_usage_error(tmp_path: Path) -> None:
    done = cli(tmp_path / "gateway.db", "audit", "verify", "--anchor", "12:nothex")
    assert done.returncode == 2 and "expected SEQ:HASH" in done.stderr


# -- rows older than the chain -----------------------------------------------------------------


def test_rows_written_before_the_chain_existed_are_counted_and_the_chain_starts_after_them(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    migrations = resources.files("qpu_gateway.store.migrations.sqlite")
    with closing(sqlite3.connect(db)) as conn:  # a database as the gateway left it before migration 0003
        conn.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for name in ("0001_core.sql", "0002_policy.sql"):
            conn.executescript(migrations.joinpath(name).read_text(encoding="utf-8"))
            conn.execute("INSERT INTO schema_migrations VALUES (?, 0)", (name,))
        for n in range(3):
            conn.execute("INSERT INTO audit (at, tool, decision) VALUES (?, 'list_jobs', 'ok')", (1000.0 + n,))
        conn.commit()

    anyio.run(append, db, 2)  # opening the store applies 0003; these two rows are chained

    done = cli(db, "audit", "verify")
    assert done.returncode == 0, done.stdout
    assert done.stdout.splitlines()[:2] == [
        "5 rows, chain intact",
        "3 rows written before the chain existed carry no hash (seq 1-3)",
    ]
    with tampering(db) as conn:  # removing the first chained row is still seen
        conn.execute("DELETE FROM audit WHERE seq = 4")
    assert cli(db, "audit", "verify").stdout.startswith("chain broken at seq 5: row missing")


# -- concurrent writers ------------------------------------------------------------------------

WRITER = """
import sys, time, anyio
from pathlib import Path
from qpu_gateway.store.records import AuditEntry
from qpu_gateway.store import open_store

db, count, name, ready, go = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5])

async def main():
    store = await open_store(db)
    try:
        ready.touch()
        while not go.exists():  # both writers start together, so their rows interleave
            await anyio.sleep(0.01)
        for n in range(count):
            await store.append_audit(AuditEntry(tool=name, decision="ok", detail=str(n)), time.time())
            await anyio.sleep(0.001)  # paced like calls, so neither writer finishes before the other starts
    finally:
        await store.close()

anyio.run(main)
"""


def test_two_processes_writing_at_once_build_one_intact_chain(tmp_path: Path) -> None:
    db, go = tmp_path / "gateway.db", tmp_path / "go"
    anyio.run(append, db, 1)  # the schema exists before the writers race
    ready = [tmp_path / f"ready_{n}" for n in range(2)]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(db), "150", f"writer_{n}", str(ready[n]), str(go)],
            stderr=subprocess.PIPE,
        )
        for n in range(2)
    ]
    deadline = time.monotonic() + 60
    while not all(path.exists() for path in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err

    with closing(sqlite3.connect(db)) as conn:
        tools = [row[0] for row in conn.execute("SELECT tool FROM audit ORDER BY seq")]
    assert len(tools) == 301
    # They really interleaved: the rows of each writer are not one block.
    switches = sum(1 for a, b in itertools.pairwise(tools[1:]) if a != b)
    assert switches > 1
    done = cli(db, "audit", "verify")
    assert (done.returncode, done.stdout.splitlines()[0]) == (0, "301 rows, chain intact")


async def test_pages_of_rows_stream_in_order_and_a_break_across_pages_is_still_explained(tmp_path: Path) -> None:
    from qpu_gateway.audit.chain import ChainVerifier

    db = tmp_path / "gateway.db"
    await append(db, 10)
    with tampering(db) as conn:
        swap_two_rows(conn, list(range(1, 10)))  # seq 5 and 6 trade places
    store = await open_store(db)
    try:
        pages = [page async for page in store.audit_pages(page_size=3)]
        verifier = ChainVerifier()
        for page in pages:
            verifier.feed(page[:1])  # one row at a time, as small as pages get
            verifier.feed(page[1:])
        report = verifier.finish(await store.audit_highest_seq())
    finally:
        await store.close()

    assert [len(page) for page in pages] == [3, 3, 3, 1]
    assert [row.seq for page in pages for row in page] == list(range(1, 11))
    assert report.broken is not None and (report.broken.seq, report.broken.kind) == (5, "reordered")
    assert (report.head_seq, report.rows) == (4, 5)


# -- export ------------------------------------------------------------------------------------


async def test_export_writes_every_row_with_its_hashes_as_json_lines(session_log: Path) -> None:
    rows = seqs(session_log)

    done = await acli(session_log, "audit", "export", "--format", "jsonl")

    assert done.returncode == 0, done.stderr
    exported = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seq"] for r in exported] == rows
    for before, row in itertools.pairwise(exported):
        assert row["prev_hash"] == before["row_hash"]
    first = exported[0]
    assert set(first) >= {"seq", "at", "time", "agent", "tool", "decision", "args_hash", "prev_hash", "row_hash"}
    assert first["time"] == datetime.fromtimestamp(first["at"], UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def test_export_since_a_seq_or_a_time_starts_there(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    t0 = datetime(2026, 11, 25, 19, 0, tzinfo=UTC).timestamp()
    anyio.run(lambda: append(db, 10, at=t0))

    after_seq = [json.loads(line)["seq"] for line in cli(db, "audit", "export", "--since", "7").stdout.splitlines()]
    from_time = cli(db, "audit", "export", "--since", "2026-11-25T19:00:04Z").stdout.splitlines()
    naive_is_utc = cli(db, "audit", "export", "--since", "2026-11-25T19:00:04").stdout.splitlines()
    offset = cli(db, "audit", "export", "--since", "2026-11-25T20:00:08+01:00").stdout.splitlines()
    beyond = cli(db, "audit", "export", "--since", "10")

    assert after_seq == [8, 9, 10]
    assert [json.loads(line)["seq"] for line in from_time] == [5, 6, 7, 8, 9, 10]
    assert naive_is_utc == from_time
    assert [json.loads(line)["time"] for line in offset] == [
        "2026-11-25T19:00:08.000000Z",
        "2026-11-25T19:00:09.000000Z",
    ]
    assert (beyond.returncode, beyond.stdout) == (0, "")


def test_export_refuses_a_since_that_is_neither_seq_nor_time(tmp_path: Path) -> None:
    done = cli(tmp_path / "gateway.db", "audit", "export", "--since", "yesterday")
    assert done.returncode == 2 and "expected a seq" in done.stderr
