"""Moving an installation: `qpu-gateway db copy` from a SQLite installation with a history to PostgreSQL
(and back), and what it refuses: a target that is not empty, a source nobody set up, a source at an
older schema, one a running gateway works on, one whose audit chain is broken. Never a password shown.

The source is a real gateway's file: keys, jobs run (or held, queued, cancelled) through MCP sessions,
an operator's pauses, and a few hundred audit rows of calls. The target is a fresh PostgreSQL database
of the test's own, and a gateway then serves on it.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import anyio
import pytest

from qpu_gateway.config import Config, Database
from qpu_gateway.jobs import pauses
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.ops.console.auth import create_operator
from qpu_gateway.store import open_store

from .conftest import TEST_POLICY
from .databases import REDIS_STORAGE, create_postgres, drop_postgres, query
from .support import BELL2, body, eventually, gateway_cmd, in_memory, new_key

pytestmark = pytest.mark.anyio

SECRET = "c0py-Pa55word"
TABLES = ("keys", "pauses", "jobs", "ledger", "agent_turns", "audit", "operators")
# What a copy reports moving, table by table: `ledger` is a view of the jobs' reservations, which
# move with the jobs, and is compared row for row with the rest.
MOVED = tuple(table for table in TABLES if table != "ledger")
# faulty/qpu has no price here: its jobs are unpriced, so each waits for an operator's approval.
POLICY = TEST_POLICY.replace('[prices."faulty/*"]\nmodel = "free"\n', "")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_cmd(*args), env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120, check=False
    )


def with_password(url: str) -> str:
    """The URL with a password in its user part (trust auth accepts it, and it must never be shown)."""
    parts = urllib.parse.urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user or 'postgres'}:{SECRET}@{host}"))


def counts(database: Database) -> dict[str, int]:
    return {table: int(query(database, f"SELECT count(*) FROM {table}")[0][0]) for table in TABLES}


def progress(stderr: str) -> dict[str, int]:
    """The rows per table the copy's JSON log lines on stderr report as copied."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    return {line["table"]: line["rows"] for line in lines if line.get("done")}


@pytest.fixture
def pg_target() -> Iterator[str]:
    """The URL of a PostgreSQL database nobody has made yet (the copy creates it), dropped afterwards."""
    url = create_postgres("qpg_copy")
    drop_postgres(url)
    yield url
    drop_postgres(url)


@dataclass
class Installation:
    config: Config
    alice: str  # keys
    carol: str  # her agent is paused
    succeeded: str  # job ids
    queued: str
    held: str
    cancelled: str
    counts: dict[str, object]  # the succeeded job's counts

    @property
    def url(self) -> str:
        return f"sqlite:///{self.config.database.path}"


@pytest.fixture
async def installation(tmp_path: Path) -> Installation:
    """A SQLite installation with a history: an Aer job run through the gateway, one queued, one held
    for an operator, one cancelled, their ledger rows, two pauses and some 300 audit rows."""
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "policy.toml").write_text(POLICY, encoding="utf-8")
    config = Config(
        database=Database(path=folder / "gateway.db"),
        policy_path=folder / "policy.toml",
        data_dir=folder,
        lease_s=3.0,
        poll_interval_s=0.1,
        faults="ok",
    )
    alice = await new_key(config.database, "alice")
    carol = await new_key(config.database, "carol")
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice) as client:
        ran = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 200}))
        done = body(await client.call_tool("wait_for_job", {"job_id": ran["job_id"], "timeout_s": 60}))
    assert done["state"] == "succeeded", done
    gateway = Gateway(config)
    async with gateway.running(workers=False), in_memory(gateway, alice) as client:
        queued = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100}))
        held = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"}))
        dropped = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 300}))
        cancelled = body(await client.call_tool("cancel_job", {"job_id": dropped["job_id"]}))
        for _ in range(140):
            await client.call_tool("get_job", {"job_id": ran["job_id"]})
            await client.call_tool("get_usage", {})
        store = gateway.store
        await pauses.pause(store, "agent", "carol", by="ops", reason="looping")
        await pauses.pause(store, "backend", "faulty/qpu", by="ops", reason="maintenance")
        await create_operator(store, "olga", "approver", "a long enough password", by="ops")  # console sign-in
    assert held["code"] == "approval_required" and cancelled["state"] == "cancelled"
    return Installation(
        config, alice, carol, ran["job_id"], queued["job_id"], held["job_id"], dropped["job_id"], done["result"]
    )


def target_config(installation: Installation, url: str, folder: Path) -> Config:
    """The installation's settings on the copy, as an operator points its gateways there."""
    moved = {"database": Database(url=url), "rate_storage": REDIS_STORAGE, "data_dir": folder}
    return Config(**{**installation.config.__dict__, **moved})


async def test_an_installation_moves_to_postgresql_and_a_gateway_there_carries_on(
    installation: Installation, pg_target: str, tmp_path: Path
) -> None:
    before = counts(installation.config.database)
    source_head = cli("audit", "verify", "--db", installation.url)

    copied = cli("db", "copy", "--from", installation.url, "--to", with_password(pg_target))

    assert copied.returncode == 0, copied.stderr
    assert SECRET not in copied.stdout + copied.stderr and "[redacted]" in copied.stdout
    assert re.search(r"\(created, \d+ migrations applied\)", copied.stdout), copied.stdout
    # a JSON line per table on stderr, with its rows
    assert progress(copied.stderr) == {table: before[table] for table in MOVED}
    target = Database(url=pg_target)
    after = counts(target)
    assert after == {**before, "audit": before["audit"] + 1}  # and the db.copy row
    verified = cli("audit", "verify", "--db", pg_target)
    assert verified.returncode == 0 and f"{before['audit'] + 1} rows, chain intact" in verified.stdout
    copy_row = query(target, "SELECT tool, operator, detail FROM audit ORDER BY seq DESC LIMIT 1")[0]
    assert copy_row[0] == "db.copy" and copy_row[1] and f"jobs {before['jobs']}" in copy_row[2]
    # The source is as it was: no row added, its chain still ends where it ended.
    assert counts(installation.config.database) == before
    assert cli("audit", "verify", "--db", installation.url).stdout == source_head.stdout

    config = target_config(installation, pg_target, tmp_path)
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, installation.alice) as client:
        listed = body(await client.call_tool("list_jobs", {}))
        old = body(await client.call_tool("get_job", {"job_id": installation.succeeded}))
        ran = body(await client.call_tool("wait_for_job", {"job_id": installation.queued, "timeout_s": 60}))
        new = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 50}))
        finished = body(await client.call_tool("wait_for_job", {"job_id": new["job_id"], "timeout_s": 60}))
        held = body(await client.call_tool("get_job", {"job_id": installation.held}))
        async with in_memory(gateway, installation.carol) as paused:
            refused = body(await paused.call_tool("list_jobs", {}))
    states = {job["job_id"]: job["state"] for job in listed["jobs"]}
    assert states[installation.succeeded] == "succeeded" and states[installation.cancelled] == "cancelled"
    assert old["result"] == installation.counts  # the old job's counts, as they were
    assert ran["state"] == "succeeded" and finished["state"] == "succeeded"
    assert held["state"] == "pending_approval"
    assert refused["code"] == "agent_paused"  # the kill switch moved with the installation
    seqs = dict(query(target, "SELECT id, seq FROM jobs"))
    assert seqs[new["job_id"]] > max(seq for job, seq in seqs.items() if job != new["job_id"])
    first_new = query(target, "SELECT min(seq) FROM audit WHERE job_id = ?", (new["job_id"],))[0][0]
    assert first_new > before["audit"] + 1  # after the copied chain and the db.copy row
    again = cli("audit", "verify", "--db", pg_target)
    assert again.returncode == 0 and "chain intact" in again.stdout, again.stdout


async def test_a_copy_back_from_postgresql_to_sqlite_gives_every_row_as_it_was(
    installation: Installation, pg_target: str, tmp_path: Path
) -> None:
    back = tmp_path / "back" / "gateway.db"
    there = cli("db", "copy", "--from", installation.url, "--to", pg_target)
    home = cli("db", "copy", "--from", with_password(pg_target), "--to", f"sqlite:///{back}")

    assert there.returncode == 0 and home.returncode == 0, home.stderr
    assert SECRET not in home.stdout + home.stderr
    source, returned = installation.config.database, Database(path=back)
    for table in TABLES:
        order = "seq" if table in ("jobs", "audit") else "1, 2"
        original = query(source, f"SELECT * FROM {table} ORDER BY {order}")
        copied = query(returned, f"SELECT * FROM {table} ORDER BY {order}")
        if table == "audit":  # plus a db.copy row for each move
            assert [row[5] for row in copied[len(original) :]] == ["db.copy", "db.copy"]
            copied = copied[: len(original)]
        assert copied == original, table
    detail = query(returned, "SELECT detail FROM audit ORDER BY seq DESC LIMIT 1")[0][0]
    assert "[redacted]" in detail and SECRET not in detail
    assert cli("audit", "verify", "--db", str(back)).returncode == 0


async def small_installation(path: Path) -> Database:
    """A SQLite installation with a key and a pause (and their audit rows), made in-process."""
    database = Database(path=path)
    await new_key(database, "alice")
    store = await open_store(database)
    try:
        await pauses.pause(store, "agent", "mallory", by="ops", reason=None)
    finally:
        await store.close()
    return database


async def test_a_target_that_is_not_empty_is_refused_and_nothing_is_written(tmp_path: Path, pg_target: str) -> None:
    source = await small_installation(tmp_path / "old.db")
    initialised = tmp_path / "new" / "gateway.db"
    assert cli("init", "--db", str(initialised)).returncode == 0  # one key and its audit row already
    first = cli("db", "copy", "--from", str(tmp_path / "old.db"), "--to", pg_target)
    assert first.returncode == 0, first.stderr
    inited_rows, pg_rows = counts(Database(path=initialised)), counts(Database(url=pg_target))

    into_init = cli("db", "copy", "--from", str(tmp_path / "old.db"), "--to", str(initialised))
    into_pg = cli("db", "copy", "--from", str(tmp_path / "old.db"), "--to", with_password(pg_target))

    for refused in (into_init, into_pg):
        assert refused.returncode == 1 and refused.stdout == ""
        error = json.loads(refused.stderr.splitlines()[-1])
        assert error["level"] == "error" and "is not empty" in error["msg"] and "nothing was written" in error["msg"]
    assert "1 keys" in into_init.stderr and "do not run `qpu-gateway init`" in into_init.stderr
    assert SECRET not in into_pg.stdout + into_pg.stderr
    assert counts(Database(path=initialised)) == inited_rows and counts(Database(url=pg_target)) == pg_rows
    assert counts(source)["keys"] == 1


def test_a_source_nobody_set_up_is_refused_without_creating_anything(tmp_path: Path) -> None:
    missing, target = tmp_path / "nothing-here.db", tmp_path / "new.db"

    refused = cli("db", "copy", "--from", f"sqlite:///{missing}", "--to", str(target))

    assert refused.returncode == 1 and "No gateway database at" in refused.stderr
    assert not missing.exists() and not target.exists()


def older_schema(path: Path, *, upto: str) -> None:
    """A database as a gateway of an earlier version left it: the migrations up to `upto` only."""
    scripts = sorted(
        (entry.name, entry.read_text(encoding="utf-8"))
        for entry in resources.files("qpu_gateway.store.migrations.sqlite").iterdir()
        if entry.name.endswith(".sql") and entry.name <= upto
    )
    with closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
        for name, script in scripts:
            db.executescript(script)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?)", (name, time.time()))
        db.execute("INSERT INTO keys VALUES ('k1', 'h', 'alice', 'default', 'read', 1.0, NULL, NULL, NULL)")
        db.commit()


def test_a_source_at_an_older_schema_is_refused_with_what_to_run(tmp_path: Path) -> None:
    source, target = tmp_path / "old.db", tmp_path / "new.db"
    older_schema(source, upto="0004_operator.sql")

    refused = cli("db", "copy", "--from", str(source), "--to", str(target))
    assert refused.returncode == 1 and not target.exists()
    migrated = cli("db", "migrate", "--db", str(source))
    copied = cli("db", "copy", "--from", str(source), "--to", str(target))

    pending = (
        "0005_worker_retries_and_timeouts.sql, 0006_processes.sql, 0007_ledger_in_jobs.sql, 0008_telemetry.sql, "
        "0009_notifications.sql, 0010_operators.sql"
    )
    assert f"{pending} not applied" in refused.stderr
    assert f"qpu-gateway db migrate --db {source}" in refused.stderr
    assert migrated.returncode == 0 and "Applied 0005_worker_retries_and_timeouts.sql" in migrated.stdout
    assert copied.returncode == 0, copied.stderr
    assert query(Database(path=target), "SELECT id FROM keys") == [("k1",)]


async def test_a_source_a_gateway_is_working_on_is_refused_until_it_stops(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(TEST_POLICY, encoding="utf-8")
    config = Config(
        database=Database(path=tmp_path / "old.db"),
        policy_path=tmp_path / "policy.toml",
        data_dir=tmp_path,
        lease_s=3.0,
        poll_interval_s=0.1,
        faults="hold:60",
        faults_dir=tmp_path / "books",
    )
    key = await new_key(config.database, "alice")
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, key) as client:
        job = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"}))

        async def running() -> bool:
            return body(await client.call_tool("get_job", {"job_id": job["job_id"]}))["state"] == "running"

        await eventually(running)
        refused = await anyio.to_thread.run_sync(
            lambda: cli("db", "copy", "--from", str(config.database.path), "--to", str(tmp_path / "new.db"))
        )
    copied = cli("db", "copy", "--from", str(config.database.path), "--to", str(tmp_path / "new.db"))

    assert refused.returncode == 1 and "held by a running gateway" in refused.stderr
    assert "stop every gateway" in refused.stderr
    assert copied.returncode == 0, copied.stderr  # stopped: the gateway handed its job back


async def test_a_source_whose_audit_chain_is_broken_is_refused_and_leaves_the_target_empty(
    tmp_path: Path, pg_target: str
) -> None:
    source = await small_installation(tmp_path / "old.db")
    with closing(sqlite3.connect(tmp_path / "old.db")) as db:  # someone edits a row behind the log's back
        db.execute("DROP TRIGGER audit_no_update")
        db.execute("UPDATE audit SET detail = 'nothing to see' WHERE seq = 1")
        db.commit()
    target = tmp_path / "new.db"

    into_file = cli("db", "copy", "--from", str(source.path), "--to", str(target))
    into_pg = cli("db", "copy", "--from", str(source.path), "--to", pg_target)

    for refused in (into_file, into_pg):
        assert refused.returncode == 1 and "audit chain is broken at seq 1" in refused.stderr
    assert not target.exists()  # the file the copy made is gone again
    assert set(counts(Database(url=pg_target)).values()) == {0}  # the rows it had inserted rolled back


async def test_a_password_in_either_url_is_never_printed_even_when_the_server_is_unreachable(tmp_path: Path) -> None:
    from .support import free_port

    source = await small_installation(tmp_path / "old.db")
    url = f"postgresql://gw:{SECRET}@127.0.0.1:{free_port()}/gateway"  # nothing listens there
    env = {"QPU_GATEWAY_BUSY_TIMEOUT_S": "1"}
    as_source = cli("db", "copy", "--from", url, "--to", str(tmp_path / "new.db"), env=env)
    as_target = cli("db", "copy", "--from", str(source.path), "--to", url, env=env)

    for done in (as_source, as_target):
        assert done.returncode == 1 and SECRET not in done.stdout + done.stderr, done.stderr
        assert "unavailable" in done.stderr and "[redacted]" in done.stderr
    assert not (tmp_path / "new.db").exists()
