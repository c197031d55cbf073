"""Work on an aiosqlite connection's own thread: whole reads in one hop, writes committed in groups.

aiosqlite's public calls make one hop per statement: a queue put, a thread wake-up and a
callback on the event loop. A job took some 140 statements, and each write transaction also
waited for the event loop to hand the connection's lock to the next caller, one transaction per
loop turn. Here a store operation is one plain function over the `sqlite3` connection:

- `read` runs it on the reader's thread in one hop; reads queue on that thread, no lock.
  `read_here_first` first tries it on the event loop's own thread, through a connection with no
  busy handler: most reads are a few rows by index, far quicker than a hop.
- `GroupWriter.run` queues it for the writer's thread, which takes every write waiting at that
  moment into one `BEGIN IMMEDIATE ... COMMIT`, each write in a savepoint of its own when there
  are several (a failing write is rolled back alone; the others commit). A write alone needs no
  savepoint, and one that is a single statement no transaction of its own. Writes that arrive during a commit go in the
  next one, so one fsync serves many calls and nothing waits on a timer. Inside the transaction
  they run one after another, so each decides on what the writes before it left (a quota check
  sees every earlier reservation, the audit chain links row to row).

The writers of one process to one database file (the store's and the rate-limit storage's) share
a write gate, a plain lock taken before `BEGIN IMMEDIATE`, so they take turns at once instead of
meeting SQLite's busy handler, which sleeps between tries. Other processes still meet it.
`write_now` makes a write on the event loop's thread when neither lock is taken, for writes with
no fsync (the rate-limit storage's).

aiosqlite keeps its queue-a-function call (`Connection._execute`) private, so the range in
pyproject.toml holds it to one minor series, and every store test runs through this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import aiosqlite
import anyio

from qpu_gateway.store import observer

log = logging.getLogger(__name__)
T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

# Writes committed together at most: a bound on how long one transaction holds the write lock.
GROUP_MAX = 256


class WouldWait(Exception):
    """The write lock is taken: the work must go where it may wait for it."""


class Busy(Exception):
    """The work waited longer than its caller's patience and was withdrawn: nothing was written."""


async def read(conn: aiosqlite.Connection, work: Work[T], patience_s: float) -> T:
    """Run `work(sqlite3 connection)` on the connection's thread; `Busy` if it has not ended within `patience_s`."""
    observer.round_trip("hop")
    carried = observer.carried(work)
    try:
        with anyio.fail_after(patience_s):
            return await _queue(conn)(lambda: carried(conn._conn))
    except TimeoutError:
        raise Busy from None


def would_wait(exc: sqlite3.Error) -> bool:
    """True for the errors a busy handler waits out: the file is locked by someone else for now."""
    text = str(exc).lower()
    return "locked" in text or "busy" in text


def quick_connection(path: os.PathLike[str] | str, *pragmas: str) -> sqlite3.Connection:
    """A connection for the event loop's own thread: no busy handler (timeout 0), so it never
    waits; a statement that would wait fails at once with "locked" (see `would_wait`)."""
    quick = sqlite3.connect(str(path), isolation_level=None, timeout=0)
    try:
        trace(quick)
        quick.row_factory = sqlite3.Row
        for pragma in pragmas:
            quick.execute(f"PRAGMA {pragma}")
    except BaseException:
        quick.close()
        raise
    return quick


async def read_here_first(
    quick: sqlite3.Connection | None, conn: aiosqlite.Connection, work: Work[T], patience_s: float
) -> T:
    """Run `work` on `quick` (opened on this thread with no busy handler) if the file lets it read at
    once; otherwise, or when called from another thread, on `conn`'s thread (`read`)."""
    if quick is not None:
        try:
            observer.round_trip("direct")
            return work(quick)
        except sqlite3.OperationalError as exc:
            if not would_wait(exc):
                raise
        except sqlite3.ProgrammingError:
            pass  # sqlite3 refuses a connection made on another thread
    return await read(conn, work, patience_s)


@dataclass(frozen=True, slots=True)
class _Write:
    """A write waiting for its group: the work, its caller's future, and how its SQL is run (under
    the caller's store operation, so an observer counts each statement to the call that caused it)."""

    work: Work[Any]
    done: Future[Any]
    execute: Callable[[sqlite3.Connection, str], object]
    single: bool  # the work is one statement: alone, it needs no BEGIN and COMMIT of its own


def _execute(db: sqlite3.Connection, sql: str) -> object:
    return db.execute(sql)


class GroupWriter:
    """One connection's write transactions, committed in groups on its thread."""

    def __init__(self, conn: aiosqlite.Connection, gate: threading.Lock, patience_s: float) -> None:
        self._conn = conn
        self._gate = gate
        self._patience_s = patience_s
        self._waiting: list[_Write] = []
        self._lock = threading.Lock()

    async def run(self, work: Work[T], *, single_statement: bool = False) -> T:
        """Run `work` in a write transaction and return what it returned, or raise what it raised.

        With `single_statement` (the work runs exactly one statement, which SQLite makes atomic by
        itself, taking the write lock before it reads) a write that finds no other waiting is run
        without BEGIN and COMMIT. `Busy` if it could not start within the patience (another process held the database
        long, or this one's queue was long): it is then withdrawn, and nothing of it is written.
        A caller cancelled before its work starts withdraws it; once started, the caller waits.
        """
        done: Future[T] = Future()
        observer.round_trip("hop")
        with self._lock:
            self._waiting.append(_Write(observer.carried(work), done, observer.carried(_execute), single_statement))
        try:
            with anyio.fail_after(self._patience_s):
                # Returns once this call's work has been committed or refused: the thread runs
                # queued calls in order, so this drain or an earlier one took it.
                await _queue(self._conn)(self._drain)
        except TimeoutError:
            if done.cancel():
                raise Busy from None
            await _outcome(done)
        except BaseException:
            if not done.cancel():
                await _outcome(done)
            raise
        return done.result()

    def _drain(self) -> None:
        """On the connection's thread: commit every waiting write, in groups, until none waits."""
        while True:
            with self._lock:
                group, self._waiting = self._waiting[:GROUP_MAX], self._waiting[GROUP_MAX:]
            # Withdrawn writes (their caller gave up before this) are left out.
            group = [write for write in group if write.done.set_running_or_notify_cancel()]
            if not group:
                with self._lock:
                    if not self._waiting:
                        return
                continue
            try:
                _commit_group(self._conn._conn, self._gate, self._patience_s, group)
            except BaseException as exc:  # the connection is gone: nobody may wait forever
                _fail_all(group, exc)
                raise


def _commit_group(db: sqlite3.Connection, gate: threading.Lock, patience_s: float, group: list[_Write]) -> None:
    """Run the writes of `group` in one transaction and commit them together.

    Several writes each get a savepoint, so a failing one is rolled back alone; a write alone
    needs none (if it fails, the whole transaction is rolled back), and a write alone that is a
    single statement needs no transaction of its own. BEGIN and COMMIT are run as the first
    write's (it opened the transaction; the others joined it).
    """
    if not gate.acquire(timeout=patience_s):
        _fail_all(group, sqlite3.OperationalError("database is locked (by another writer of this process)"))
        return
    try:
        if len(group) == 1:
            _commit_one(db, group[0])
            return
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        opener = group[0].execute
        try:
            opener(db, "BEGIN IMMEDIATE")
            for write in group:
                write.execute(db, "SAVEPOINT one_write")
                try:
                    value = write.work(db)
                except Exception as exc:
                    if not db.in_transaction:
                        raise  # SQLite ended the whole transaction (disk full, I/O error): all fail
                    write.execute(db, "ROLLBACK TO one_write")
                    write.execute(db, "RELEASE one_write")
                    outcomes.append((write.done, False, exc))
                else:
                    write.execute(db, "RELEASE one_write")
                    outcomes.append((write.done, True, value))
            opener(db, "COMMIT")
        except Exception as exc:
            rollback(db)
            _fail_all(group, exc)
            return
    finally:
        gate.release()
    for done, ok, value in outcomes:
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)


def _commit_one(db: sqlite3.Connection, write: _Write) -> None:
    """A group of one write: its own transaction, or none for a single statement."""
    try:
        if not write.single:
            write.execute(db, "BEGIN IMMEDIATE")
        value = write.work(db)
        if not write.single:
            write.execute(db, "COMMIT")
    except Exception as exc:
        rollback(db)
        write.done.set_exception(exc)
    else:
        write.done.set_result(value)


def write_now(db: sqlite3.Connection, gate: threading.Lock, work: Work[T], *, single_statement: bool = False) -> T:
    """Run `work` in a write transaction on this thread, unless that would wait: `WouldWait` (and
    nothing done) if this process's other writer or another process holds the write lock. `db`
    must have no busy handler (timeout 0), so it never waits. With `single_statement` (the work
    is exactly one statement, atomic by itself) it runs without BEGIN and COMMIT."""
    if not gate.acquire(blocking=False):
        raise WouldWait
    observer.round_trip("direct")
    try:
        if single_statement:
            try:
                return work(db)
            except sqlite3.OperationalError as exc:
                if would_wait(exc) and not db.in_transaction:
                    raise WouldWait from None  # the statement never started: nothing was written
                raise
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if would_wait(exc):
                raise WouldWait from None
            raise
        try:
            result = work(db)
            db.execute("COMMIT")
        except BaseException:
            rollback(db)
            raise
        return result
    finally:
        gate.release()


def trace(db: sqlite3.Connection) -> None:
    """Report every statement `db` runs to the store's observer, if one is installed."""
    if observer.current() is not None:
        db.set_trace_callback(observer.statement)


async def trace_async(conn: aiosqlite.Connection) -> None:
    """`trace` for an aiosqlite connection (set on its own thread)."""
    if observer.current() is not None:
        await conn.set_trace_callback(observer.statement)


def _fail_all(group: list[_Write], exc: BaseException) -> None:
    for write in group:
        if not write.done.done():
            write.done.set_exception(exc)


async def _outcome(done: Future[T]) -> None:
    """Wait, shielded, for a write that has started: it must be seen through to its end."""
    with anyio.CancelScope(shield=True):
        await asyncio.wait([asyncio.wrap_future(done)])


def _queue(conn: aiosqlite.Connection) -> Callable[[Callable[[], T]], Awaitable[T]]:
    queue: Callable[[Callable[[], T]], Awaitable[T]] = conn._execute
    return queue


_gates: dict[str, threading.Lock] = {}
_gates_lock = threading.Lock()


def write_gate(path: os.PathLike[str] | str) -> threading.Lock:
    """The lock this process's writers to the database file at `path` take before writing."""
    key = os.path.realpath(path)
    with _gates_lock:
        return _gates.setdefault(key, threading.Lock())


def rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction. SQLite has already rolled back some (a full disk, an I/O error)
    by itself, so there may be nothing left to end; a failed ROLLBACK is logged, and the original
    error is what the caller sees."""
    if not db.in_transaction:
        return
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        log.error("rollback failed: %s", exc)


async def on_thread(conn: aiosqlite.Connection, work: Work[T]) -> T:
    """Run `work` on the connection's thread and wait for it however long it takes: one step of a
    transaction that spans several hops (a copy's import), which must never be withdrawn half-way.
    Steps queued one after another run in that order, so a rollback queued after a step follows it."""
    return await _queue(conn)(lambda: work(conn._conn))
