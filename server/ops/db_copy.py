"""`qpu-gateway db copy`: move an installation from one database to another through the store seam.

What moves is `records.INSTALLATION_TABLES` (keys, pauses, jobs with their reservations, agent
turns, the audit chain), row for row: seqs, hashes and times as they were, so the old keys work,
the old jobs keep their ids and queue order, budgets carry over and `audit verify` passes on the
target. Rate-limit
counters stay behind (they describe the last minutes only), as do the policy file and `local.key`,
which are files, not rows.

The source is read in one snapshot and never written. The target must be empty (a database that
`init` set up holds a key already, and is refused); one that does not exist yet is created and
migrated first. The rows go in in one transaction on the target, with a `db.copy` row that
continues the chain, so a copy that fails or is refused part-way leaves the target as empty as it
found it. Any direction works (SQLite or PostgreSQL on either side): the copy only asks the two
stores for pages of rows and hands them over; it never names a driver.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path

import anyio

from qpu_gateway.audit.chain import ChainVerifier
from qpu_gateway.audit.operators import operator_entry
from qpu_gateway.config import Database
from qpu_gateway.jobs.states import JobState
from qpu_gateway.store import Store, open_store, store_initialised
from qpu_gateway.store.records import INSTALLATION_TABLES, AuditEntry, AuditRecord, TablePage

log = logging.getLogger(__name__)

PAGE_SIZE = 1000
# A progress line for a table at least this often (rows), besides one when the table is done.
PROGRESS_EVERY = 10_000
_AUDIT_FIELDS = frozenset(f.name for f in fields(AuditRecord))


class CopyRefused(Exception):
    """The copy was refused or abandoned and the target holds nothing of it; the message says why
    and what to do (never a password)."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    rows: dict[str, int]  # rows copied per table (the `db.copy` audit row not counted)
    head_seq: int  # the target's audit head: the `db.copy` row, after the copied chain
    head_hash: str
    created: bool  # the target database did not exist and was made
    migrations: list[str]  # applied to the target before the copy
    seconds: float


def same_database(a: Database, b: Database) -> bool:
    """Whether two locations name one database (the same file, or the same server and database name)."""
    if a.path is not None and b.path is not None:
        return os.path.realpath(a.path) == os.path.realpath(b.path)
    if a.url is not None and b.url is not None:
        pa, pb = urllib.parse.urlsplit(a.url), urllib.parse.urlsplit(b.url)
        return (pa.hostname or "", pa.port or 5432, pa.path.strip("/")) == (
            pb.hostname or "",
            pb.port or 5432,
            pb.path.strip("/"),
        )
    return False


async def copy_installation(source: Database, target: Database, *, by: str, page_size: int = PAGE_SIZE) -> CopyReport:
    """Copy everything an installation keeps from `source` into the empty `target`; all or nothing.

    Raises CopyRefused (nothing written) for a source that is not a gateway database, is at another
    schema version or is in use, a target that is not empty, or a source whose audit chain is broken.
    """
    started = time.monotonic()
    source, target = _absolute(source), _absolute(target)
    if same_database(source, target):
        raise CopyRefused(f"--from and --to name the same database ({source}); nothing was copied")
    if not await anyio.to_thread.run_sync(store_initialised, source):
        raise CopyRefused(
            f"No gateway database at {source}: nothing to copy. Give --from the database the gateways use "
            "(`qpu-gateway paths` shows it)."
        )
    src = await open_store(source, migrate=False)
    try:
        await _check_source(src, source)
        expected = await src.row_counts()
        highest = await src.audit_highest_seq()
        async with _prepared_target(target) as (dst, created, migrations):
            entry = _copy_entry(source, by)
            pages = _checked(src.export_rows(page_size=page_size), expected, highest, source)
            async with aclosing(pages):
                rows = await dst.import_rows(pages, now=time.time(), audit=entry)
            head = (await dst.audit_tail(limit=1))[-1]
    finally:
        await src.close()
    assert head.row_hash is not None
    return CopyReport(rows, head.seq, head.row_hash, created, migrations, time.monotonic() - started)


def _absolute(database: Database) -> Database:
    """A SQLite location as an absolute path (`--from gateway.db` is read from here, and shown so)."""
    return Database(path=Path(os.path.abspath(database.path))) if database.path is not None else database


async def _check_source(store: Store, source: Database) -> None:
    """Refuse a source at another schema version, or one a running gateway is working on."""
    state = await store.schema_state()
    if state.unknown:
        raise CopyRefused(
            f"The source {source} has migrations this qpu-gateway does not know ({', '.join(state.unknown)}): "
            "it was used by a newer version. Run the copy with that version."
        )
    if state.pending:
        raise CopyRefused(
            f"The source {source} is at an older schema: {', '.join(state.pending)} not applied. Bring it up to "
            f"date first with `qpu-gateway db migrate --db {source}` (or start a gateway of this version on it "
            "once), then copy."
        )
    now = time.time()
    held = [
        job
        for state_ in (JobState.SUBMITTING, JobState.RUNNING)
        for job in await store.list_jobs(agent=None, state=state_, limit=10_000, before_seq=None)
        if job.lease_owner is not None and (job.lease_expires or 0) > now
    ]
    if held:
        until = max(job.lease_expires or 0 for job in held) - now
        raise CopyRefused(
            f"{len(held)} job(s) of the source {source} are held by a running gateway (worker "
            f"{held[0].lease_owner}): stop every gateway on it first (a gateway that stops hands its jobs "
            f"back; one that was killed lets its leases lapse within {until:.0f} s), then copy."
        )


@asynccontextmanager
async def _prepared_target(target: Database) -> AsyncIterator[tuple[Store, bool, list[str]]]:
    """The target store, refused if it holds any row, migrated if it is new or behind; a SQLite file
    this made is removed again if the copy fails (a PostgreSQL database it made stays, empty)."""
    created = False
    made_file = False
    if target.url is not None:
        from qpu_gateway.store.postgres import create_database

        created = await anyio.to_thread.run_sync(create_database, target.url)
    else:
        assert target.path is not None
        if target.path.exists() and not store_initialised(target) and target.path.stat().st_size > 0:
            raise CopyRefused(f"{target} exists and is not a gateway database; nothing was written")
        made_file = created = not target.path.exists()
    initialised = not created and await anyio.to_thread.run_sync(store_initialised, target)
    try:
        store = await open_store(target, migrate=False)
        try:
            if initialised:
                state = await store.schema_state()
                if state.unknown:
                    raise CopyRefused(
                        f"The target {target} was set up by a newer qpu-gateway ({', '.join(state.unknown)}); "
                        "nothing was written"
                    )
                if state.pending:
                    raise CopyRefused(
                        f"The target {target} is at an older schema ({', '.join(state.pending)} not applied); "
                        "nothing was written. Give --to a new database, or bring this one up to date with "
                        f"`qpu-gateway db migrate --db {target}` if it is empty."
                    )
                held = {table: n for table, n in (await store.row_counts()).items() if n}
                if held:
                    rows = ", ".join(f"{n} {table}" for table, n in held.items())
                    raise CopyRefused(
                        f"The target {target} is not empty ({rows}): a copy goes only into an empty database, "
                        "so nothing was written. Give --to a new database (the copy creates and migrates it; "
                        "do not run `qpu-gateway init` on it first), or drop this one if it is a failed trial."
                    )
            migrations = await store.migrate()
            yield store, created, migrations
        finally:
            await store.close()
    except BaseException:
        if made_file:
            _remove_sqlite(target.path)
        raise


def _remove_sqlite(path: Path | None) -> None:
    assert path is not None
    for suffix in ("", "-wal", "-shm"):
        with suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


def _copy_entry(source: Database, by: str) -> Callable[[Mapping[str, int]], AuditEntry]:
    """The `db.copy` row the target's chain continues with, once the rows copied are counted."""

    def entry(rows: Mapping[str, int]) -> AuditEntry:
        counts = ", ".join(f"{table} {n}" for table, n in rows.items())
        return operator_entry("db.copy", by, detail=f"installation copied from {source} by operator {by}: {counts}")

    return entry


async def _checked(
    pages: AsyncGenerator[TablePage], expected: Mapping[str, int], highest: int, source: Database
) -> AsyncGenerator[TablePage]:
    """The source's pages as they go by: a progress line per table (and every PROGRESS_EVERY rows),
    and the audit chain verified, so that a broken chain abandons the copy before the target commits."""
    verifier = ChainVerifier()
    order = list(INSTALLATION_TABLES)
    done = dict.fromkeys(order, 0)
    closed = 0  # tables before order[closed] are done and logged

    def close_before(index: int) -> None:
        nonlocal closed
        for table in order[closed:index]:
            _progress(table, done[table], expected, finished=True)
        closed = max(closed, index)

    async with aclosing(pages):
        async for page in pages:
            close_before(order.index(page.table))
            if page.table == "audit":
                verifier.feed(
                    AuditRecord(**{c: v for c, v in zip(page.columns, row, strict=True) if c in _AUDIT_FIELDS})
                    for row in page.rows
                )
            yield page
            before, done[page.table] = done[page.table], done[page.table] + len(page.rows)
            if done[page.table] // PROGRESS_EVERY > before // PROGRESS_EVERY:
                _progress(page.table, done[page.table], expected, finished=False)
    close_before(len(order))
    report = verifier.finish(highest)
    if report.broken is not None:
        raise CopyRefused(
            f"The source's audit chain is broken at seq {report.broken.seq}: {report.broken.message}. Nothing was "
            "written: a copy would carry a chain that no longer verifies. See "
            f"`qpu-gateway audit verify --db {source}`."
        )


def _progress(table: str, rows: int, expected: Mapping[str, int], *, finished: bool) -> None:
    log.info(
        "%s %s (%d rows)",
        "copied" if finished else "copying",
        table,
        rows,
        extra={"table": table, "rows": rows, "of": max(rows, expected.get(table, 0)), "done": finished},
    )
