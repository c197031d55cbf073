"""A `limits` async storage in SQLite, so rate limits hold across every process sharing one file.

Every Claude Code session starts its own stdio gateway process; an in-memory storage would give
each of them its own allowance. This storage keeps the counts in the gateway's database file
instead, in two tables of its own (created on first use): `rate_hits` for the moving window
and `rate_counters` for fixed and sliding-window counters.

URI form, absolute path after three slashes (percent-encode anything unusual; `storage_uri`
does it)::

    async+qpu-sqlite:///var/lib/qpu-gateway/gateway.db

`limits` registers storages by scheme when their class is defined, so import this module first,
then `limits.storage.storage_from_string(uri)` returns a `SqliteRateStorage` (`limits.aio.storage`
has no `storage_from_string` of its own; the one factory serves sync and async schemes).

A moving-window hit is one statement: an `INSERT ... SELECT` that reads the window's use and
adds the hit only if it leaves room. SQLite takes the write lock before such a statement reads,
so check-and-insert is one step for every process and the decision is exact under any
contention, with no transaction of its own; a key's hits that left its window are deleted once
per window length, in the same transaction as a hit. A hit has no fsync (`synchronous = NORMAL`),
so it is made at once on the event loop's thread when the write lock is free; otherwise it runs
whole on the connection's thread, which waits for the lock, committed with the other hits
waiting then (`server/store/sqlite_thread.py`).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from math import floor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import anyio
from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.errors import ConfigurationError, StorageError
from limits.storage.base import TimestampedSlidingWindow

from qpu_gateway.store import observer
from qpu_gateway.store.sqlite_thread import (
    Busy,
    GroupWriter,
    WouldWait,
    quick_connection,
    read_here_first,
    trace_async,
    write_gate,
    write_now,
)

SCHEME = "async+qpu-sqlite"
T = TypeVar("T")
_BUSY_TIMEOUT_S = 10.0

_SCHEMA = (
    # One row per moving-window hit, clustered by key (WITHOUT ROWID), each carrying the running
    # total of its key's amounts. A window's use is then the newest total minus the total before
    # the window's first hit: two lookups, however many hits the window holds. The first version
    # (`rate_entries`, a rowid table with two indexes) summed the window row by row: 113 us of a
    # 5000/second limit's 135 us hit at 2,000 hits in the window on this machine.
    """
    CREATE TABLE IF NOT EXISTS rate_hits (
        key        TEXT    NOT NULL,
        at         REAL    NOT NULL,  -- time.time() when acquired, never before the key's newest hit
        tie        INTEGER NOT NULL,  -- 0, 1, ... among a key's hits at one instant
        amount     INTEGER NOT NULL,  -- the cost it consumed (one row per hit, however many shots)
        total      INTEGER NOT NULL,  -- the key's amounts so far, this hit included
        expires_at REAL    NOT NULL,  -- at + the limit's window, for the sweep of keys no longer hit
        PRIMARY KEY (key, at, tie)
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE IF NOT EXISTS rate_counters (
        key        TEXT    PRIMARY KEY,
        count      INTEGER NOT NULL,
        expires_at REAL    NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS rate_counters_by_expiry ON rate_counters (expires_at)",
)
# The first version's table, if the file has one: its hits are moved over once, so no window
# restarts on upgrade (a process of the old version still running would count apart until it stops).
_FIRST_VERSION = (
    """
    INSERT OR IGNORE INTO rate_hits (key, at, tie, amount, total, expires_at)
    SELECT key, at, row_number() OVER (PARTITION BY key, at ORDER BY rowid) - 1, amount,
           sum(amount) OVER (PARTITION BY key ORDER BY at, rowid), expires_at
    FROM rate_entries
    """,
    "DROP TABLE rate_entries",
)
# A key's own hits that have left its window go at each hit of that key (they sit just before
# the window in the key's range); hits of keys nobody hits any more are swept now and then.
_PRUNE_KEY = "DELETE FROM rate_hits WHERE key = ? AND at <= ?"
_SWEEP_HITS = "DELETE FROM rate_hits WHERE expires_at <= ?"
_SWEEP_EVERY_S = 60.0
# The keys whose left-behind hits were pruned lately, at most this many remembered (then forgotten
# all at once: a forgotten key is pruned at its next hit).
_PRUNED_KEYS_MAX = 10_000
_PRUNE_COUNTERS = "DELETE FROM rate_counters WHERE expires_at <= ?"
_NEWEST_HIT = "SELECT at, tie, total FROM rate_hits WHERE key = ? ORDER BY at DESC, tie DESC LIMIT 1"
# The first hit after the given instant, and the key's total before it.
_FIRST_IN_WINDOW = "SELECT at, total - amount FROM rate_hits WHERE key = ? AND at > ? ORDER BY at, tie LIMIT 1"
# A hit in one statement: the window's use is read (as `_moving_window` does) and the hit added
# only if it leaves room, all inside the INSERT, which takes the write lock before it reads, so
# check-and-add is one step for every process without a transaction of its own. A clock that
# stepped back records the hit at the newest one's instant (the next tie), so a key's totals grow
# in the order of its hits' times, which the window arithmetic relies on.
_ACQUIRE = """
INSERT INTO rate_hits (key, at, tie, amount, total, expires_at)
SELECT :key, max(:now, coalesce(n.at, :now)),
       CASE WHEN n.at IS NOT NULL AND :now <= n.at THEN n.tie + 1 ELSE 0 END,
       :amount, coalesce(n.total, 0) + :amount, max(:now, coalesce(n.at, :now)) + :expiry
FROM (SELECT 1)
LEFT JOIN (SELECT at, tie, total FROM rate_hits WHERE key = :key ORDER BY at DESC, tie DESC LIMIT 1) AS n
LEFT JOIN (SELECT total - amount AS before FROM rate_hits WHERE key = :key AND at > :since
           ORDER BY at, tie LIMIT 1) AS o
WHERE coalesce(n.total - o.before, 0) + :amount <= :limit
"""
# Several hits in one statement, for the rules one call counts against (`acquire_entries`): each
# wanted hit (its place, and key, limit, window and cost from a JSON array) is read as `_ACQUIRE`
# reads one, and the hits before the first that has no room are added, so the statement does what
# acquiring them one by one, stopping at the first refusal, would do. Each hit has a key of its own
# (`acquire_entries` refuses repeats), so no hit's room depends on another's. The `WITH` sits inside
# the INSERT, so the statement still begins with INSERT (`sqlite3` reports rowcount only then).
_ACQUIRE_SEVERAL = """
INSERT INTO rate_hits (key, at, tie, amount, total, expires_at)
WITH want AS MATERIALIZED (
    SELECT CAST(w.key AS INTEGER) AS i, json_extract(w.value, '$[0]') AS key,
           json_extract(w.value, '$[1]') AS lim, json_extract(w.value, '$[2]') AS expiry,
           json_extract(w.value, '$[3]') AS amount
    FROM json_each(:entries) AS w
),
state AS MATERIALIZED (
    SELECT want.*, n.at AS n_at, n.tie AS n_tie, n.total AS n_total,
           coalesce(n.total - (o.total - o.amount), 0) + want.amount <= want.lim AS room
    FROM want
    LEFT JOIN rate_hits AS n ON n.key = want.key AND (n.at, n.tie) =
        (SELECT at, tie FROM rate_hits WHERE key = want.key ORDER BY at DESC, tie DESC LIMIT 1)
    LEFT JOIN rate_hits AS o ON o.key = want.key AND (o.at, o.tie) =
        (SELECT at, tie FROM rate_hits WHERE key = want.key AND at > :now - want.expiry ORDER BY at, tie LIMIT 1)
)
SELECT key, max(:now, coalesce(n_at, :now)),
       CASE WHEN n_at IS NOT NULL AND :now <= n_at THEN n_tie + 1 ELSE 0 END,
       amount, coalesce(n_total, 0) + amount, max(:now, coalesce(n_at, :now)) + expiry
FROM state
WHERE i < coalesce((SELECT min(i) FROM state WHERE NOT room), :count)
"""
_COUNTER = "SELECT count, expires_at FROM rate_counters WHERE key = ? AND expires_at > ?"
_TWO_COUNTERS = "SELECT key, count FROM rate_counters WHERE key IN (?, ?) AND expires_at > ?"
# A counter's expiry is set when it is created and kept while it grows (a fixed window).
_ADD_TO_COUNTER = """
INSERT INTO rate_counters (key, count, expires_at) VALUES (?, ?, ?)
ON CONFLICT (key) DO UPDATE SET count = count + excluded.count
RETURNING count
"""
_CLEAR_HITS = "DELETE FROM rate_hits WHERE key = ?"
_CLEAR_COUNTER = "DELETE FROM rate_counters WHERE key = ?"
_CLEAR_TWO_COUNTERS = "DELETE FROM rate_counters WHERE key IN (?, ?)"
_KEY_COUNT = "SELECT (SELECT count(*) FROM rate_counters) + (SELECT count(DISTINCT key) FROM rate_hits)"
_CLEAR_ALL_HITS = "DELETE FROM rate_hits"
_CLEAR_ALL_COUNTERS = "DELETE FROM rate_counters"


def storage_uri(path: Path) -> str:
    """The URI that names the rate-limit storage in the database file at `path`."""
    return f"{SCHEME}://{urllib.parse.quote(str(path.resolve()))}"


def _path_of(uri: str) -> Path:
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query or parts.fragment:
        raise ConfigurationError(
            f"{uri!r} is not a {SCHEME} URI: write the database file's absolute path after three slashes, "
            f"as in {SCHEME}:///var/lib/qpu-gateway/gateway.db"
        )
    return Path(urllib.parse.unquote(parts.path))


def _moving_window(
    db: sqlite3.Connection, key: str, since: float
) -> tuple[float | None, int, tuple[float, int, int] | None]:
    """(oldest hit after `since`, the cost of the hits after it, the key's newest hit (at, tie, total))."""
    newest = db.execute(_NEWEST_HIT, (key,)).fetchone()
    first = db.execute(_FIRST_IN_WINDOW, (key, since)).fetchone() if newest is not None else None
    if newest is None or first is None:
        return None, 0, newest
    return float(first[0]), int(newest[2]) - int(first[1]), newest


def _one_row(db: sqlite3.Connection, sql: str, params: Iterable[Any]) -> Any:
    row = db.execute(sql, tuple(params)).fetchone()
    if row is None:  # only called for aggregates and RETURNING, which always give one row
        raise sqlite3.DatabaseError("expected one row, got none")
    return row


async def _prepare(conn: aiosqlite.Connection) -> None:
    """Put the file in WAL mode and create this storage's tables if they are missing."""
    await conn.execute("PRAGMA journal_mode = WAL")
    await conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            await conn.execute(statement)
        async with conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'rate_entries'") as cursor:
            first_version = await cursor.fetchone() is not None
        for statement in _FIRST_VERSION if first_version else ():
            await conn.execute(statement)
        await conn.execute("COMMIT")
    except BaseException:
        with anyio.CancelScope(shield=True):
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
        raise


@observer.operations("rate_limit.")
class SqliteRateStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    """Rate-limit state in a SQLite file: moving window, sliding window counter and fixed window."""

    # limits' metaclass registers the class under these schemes. Not a ClassVar: the base class
    # declares a plain attribute, and mypy rejects overriding that with a ClassVar.
    STORAGE_SCHEME = [SCHEME]  # noqa: RUF012

    def __init__(self, uri: str, wrap_exceptions: bool = False, **options: float | str | bool) -> None:
        super().__init__(uri, wrap_exceptions=wrap_exceptions, **options)
        self.path = _path_of(uri)
        self._gate = write_gate(self.path)  # shared with the store's writer in this process
        self._conn: aiosqlite.Connection | None = None
        self._writer: GroupWriter | None = None
        # A second connection on the event loop's own thread, with no busy handler: a hit is a few
        # statements in microseconds, so it is made here at once when the write lock is free, and
        # goes to the connection's thread (which may wait for the lock) only when it is not.
        self._quick: sqlite3.Connection | None = None
        # Held while the connection is opened or closed; its work queues on its thread.
        self._lock = anyio.Lock()
        self._next_sweep = 0.0
        # key -> when its hits that left the window are next deleted. Left-behind hits cost no
        # lookup (the window is found by seeking, not scanning), only room, so a key is pruned
        # once per window length rather than at every hit: most hits are then one statement.
        self._next_prune: dict[str, float] = {}

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return sqlite3.Error

    async def aclose(self) -> None:
        """Close the connection; a later call opens a new one."""
        async with self._lock:
            if self._quick is not None:
                self._quick.close()
                self._quick = None
            if self._conn is not None:
                conn, self._conn, self._writer = self._conn, None, None
                await conn.close()

    # -- connection and transactions -------------------------------------------------------------

    async def _connection(self) -> tuple[aiosqlite.Connection, GroupWriter]:
        """The open connection and its writer, made on first use."""
        if self._conn is not None and self._writer is not None:
            return self._conn, self._writer
        async with self._lock:
            return await self._open()

    async def _open(self) -> tuple[aiosqlite.Connection, GroupWriter]:
        if self._conn is None or self._writer is None:
            await anyio.Path(self.path.parent).mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
            try:
                await trace_async(conn)
                await conn.execute("PRAGMA busy_timeout = 10000")
                # NORMAL, not FULL: a power cut may forget the last few hits (a little allowance
                # handed back; money lives in the store's ledger), where an fsync per hit would
                # slow every call.
                await conn.execute("PRAGMA synchronous = NORMAL")
                deadline = time.monotonic() + _BUSY_TIMEOUT_S
                while True:
                    try:
                        await _prepare(conn)
                        break
                    except sqlite3.OperationalError as exc:
                        # Processes opening a brand-new file (still in rollback-journal mode) can
                        # deadlock on the switch to WAL, the one case where SQLite answers "locked"
                        # at once instead of waiting: wait here instead. Setup is idempotent.
                        if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                            raise
                        await anyio.sleep(0.02)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await conn.close()
                raise
            self._conn, self._writer = conn, GroupWriter(conn, self._gate, _BUSY_TIMEOUT_S)
            # No checkpoints of its own (the threaded connections run them): nothing it does waits
            # for a lock or an fsync.
            self._quick = quick_connection(self.path, "synchronous = NORMAL", "wal_autocheckpoint = 0")
        return self._conn, self._writer

    async def _read(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        """`work(connection, now)` for single statements (each is its own snapshot): here at once
        when the file lets it, else in one hop to the connection's thread."""
        conn, _ = await self._connection()
        try:
            return await read_here_first(self._quick, conn, lambda db: work(db, time.time()), _BUSY_TIMEOUT_S)
        except Busy:
            raise sqlite3.OperationalError("database is locked") from None

    async def _write(self, work: Callable[[sqlite3.Connection, float], T], *, single_statement: bool = False) -> T:
        """`work(connection, now)` in a write transaction holding SQLite's write lock (committed with
        the other hits waiting then), or none when it is `single_statement`. `now` is read once the
        lock is held: a process that waited for the lock must not decide with the instant it
        started waiting."""
        _, writer = await self._connection()
        if self._quick is not None:
            with contextlib.suppress(WouldWait):
                return write_now(
                    self._quick, self._gate, lambda db: work(db, time.time()), single_statement=single_statement
                )
        try:
            return await writer.run(lambda db: work(db, time.time()), single_statement=single_statement)
        except Busy:
            raise sqlite3.OperationalError("database is locked") from None

    # -- counters (fixed window) -----------------------------------------------------------------

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add `amount` to the counter at `key`, creating it to expire in `expiry` seconds."""

        def work(db: sqlite3.Connection, now: float) -> int:
            db.execute(_PRUNE_COUNTERS, (now,))
            return int(_one_row(db, _ADD_TO_COUNTER, (key, amount, now + expiry))[0])

        return await self._write(work)

    async def get(self, key: str) -> int:
        """The counter at `key`, 0 once it has expired."""
        row = await self._read(lambda db, now: db.execute(_COUNTER, (key, now)).fetchone())
        return int(row[0]) if row is not None else 0

    async def get_expiry(self, key: str) -> float:
        """When the counter at `key` expires (now if there is none)."""
        row, now = await self._read(lambda db, now: (db.execute(_COUNTER, (key, now)).fetchone(), now))
        return float(row[1]) if row is not None else now

    async def check(self) -> bool:
        """Whether the database file can be opened and read."""
        try:
            await self._read(lambda db, _: db.execute("SELECT 1").fetchall())
        except sqlite3.Error:
            return False
        return True

    async def reset(self) -> int | None:
        """Forget every limit in the file; returns how many keys there were."""

        def work(db: sqlite3.Connection, _: float) -> int:
            count = int(_one_row(db, _KEY_COUNT, ())[0])
            db.execute(_CLEAR_ALL_HITS)
            db.execute(_CLEAR_ALL_COUNTERS)
            return count

        return await self._write(work)

    async def clear(self, key: str) -> None:
        """Forget the entries and the counter at `key`."""

        def work(db: sqlite3.Connection, _: float) -> None:
            db.execute(_CLEAR_HITS, (key,))
            db.execute(_CLEAR_COUNTER, (key,))

        await self._write(work)

    # -- moving window ---------------------------------------------------------------------------

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Record a hit of cost `amount` if the last `expiry` seconds leave room for it under `limit`."""
        if amount > limit:
            return False
        if amount <= 0:  # nothing to count: only whether the window is over its limit already
            _, used, _ = await self._read(lambda db, now: _moving_window(db, key, now - expiry))
            return used + amount <= limit
        return await self._acquire(key, limit, expiry, amount)

    async def _acquire(self, key: str, limit: int, expiry: int, amount: int) -> bool:
        """A hit of `amount` > 0: one statement (`_ACQUIRE`), and now and then a prune before it."""
        upkeep = time.time() >= min(self._next_sweep, self._next_prune.get(key, 0.0))

        def work(db: sqlite3.Connection, now: float) -> bool:
            if upkeep:
                self._sweep_now_and_then(db, now)
                self._prune_now_and_then(db, key, expiry, now)
            params = {"key": key, "since": now - expiry, "now": now, "amount": amount, "expiry": expiry, "limit": limit}
            return db.execute(_ACQUIRE, params).rowcount == 1

        return await self._write(work, single_statement=not upkeep)

    async def acquire_entries(self, entries: Sequence[tuple[str, int, int, int]]) -> int:
        """Hits of several keys, each (key, limit, expiry, amount), in one statement: the hits before
        the first one without room are recorded, and how many that is comes back (`len(entries)`
        when all were). The same as `acquire_entry` of each in turn, stopping at the first refusal,
        without a statement per hit (`limits` has no call for this; the gateway's `RateLimiter` uses
        it for a call that counts against several rules)."""
        keys = [key for key, _, _, _ in entries]
        if len(set(keys)) != len(keys):
            raise ValueError("acquire_entries needs a key of its own for each hit")
        if any(amount <= 0 for _, _, _, amount in entries):
            raise ValueError("acquire_entries counts hits of a positive cost; use acquire_entry for a check")
        try:
            return await self._acquire_several(entries)
        except sqlite3.Error as exc:
            if self.wrap_exceptions:  # as `limits` does for the methods of its own interface
                raise StorageError(exc) from exc
            raise

    async def _acquire_several(self, entries: Sequence[tuple[str, int, int, int]]) -> int:
        if not entries:
            return 0
        due = time.time()
        upkeep = due >= self._next_sweep or any(due >= self._next_prune.get(key, 0.0) for key, *_ in entries)
        wanted = json.dumps([list(entry) for entry in entries])

        def work(db: sqlite3.Connection, now: float) -> int:
            if upkeep:
                self._sweep_now_and_then(db, now)
                for key, _, expiry, _ in entries:
                    self._prune_now_and_then(db, key, expiry, now)
            return db.execute(_ACQUIRE_SEVERAL, {"entries": wanted, "now": now, "count": len(entries)}).rowcount

        return await self._write(work, single_statement=not upkeep)

    def _sweep_now_and_then(self, db: sqlite3.Connection, now: float) -> None:
        """Drop expired hits of every key, at most once a minute per process (a scan of the table)."""
        if now >= self._next_sweep:
            db.execute(_SWEEP_HITS, (now,))
            self._next_sweep = now + _SWEEP_EVERY_S

    def _prune_now_and_then(self, db: sqlite3.Connection, key: str, expiry: int, now: float) -> None:
        """Drop the key's hits that left its window, at most once per window length."""
        if now >= self._next_prune.get(key, 0.0):
            db.execute(_PRUNE_KEY, (key, now - expiry))
            if len(self._next_prune) >= _PRUNED_KEYS_MAX:
                self._next_prune.clear()
            self._next_prune[key] = now + expiry

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        """(oldest hit in the window, total cost in it); (now, 0) for an empty window."""
        (oldest, used, _), now = await self._read(lambda db, now: (_moving_window(db, key, now - expiry), now))
        return (now, 0) if oldest is None else (oldest, used)

    # -- sliding window counter ------------------------------------------------------------------

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Count a hit of cost `amount` if the weighted previous window plus the current one leave room."""
        if amount > limit:
            return False

        def work(db: sqlite3.Connection, now: float) -> bool:
            db.execute(_PRUNE_COUNTERS, (now,))
            previous, previous_ttl, current, _ = self._sliding_window(db, key, expiry, now)
            if floor(previous * previous_ttl / expiry) + current + amount > limit:
                return False
            _, current_key = self.sliding_window_keys(key, expiry, now)
            # A window's counter matters until the end of the next window, when it stops being "previous".
            _one_row(db, _ADD_TO_COUNTER, (current_key, amount, (int(now / expiry) + 2) * expiry))
            return True

        return await self._write(work)

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """(previous count, its weight in seconds, current count, seconds until it expires)."""
        return await self._read(lambda db, now: self._sliding_window(db, key, expiry, now))

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Forget both windows' counters of `key`."""
        await self._write(lambda db, now: db.execute(_CLEAR_TWO_COUNTERS, self.sliding_window_keys(key, expiry, now)))

    def _sliding_window(
        self, db: sqlite3.Connection, key: str, expiry: int, now: float
    ) -> tuple[int, float, int, float]:
        # Windows are aligned on multiples of `expiry` (TimestampedSlidingWindow), as in the memory
        # storage, so the TTLs follow from the clock and only the counts are stored.
        previous_key, current_key = self.sliding_window_keys(key, expiry, now)
        counts = {row[0]: int(row[1]) for row in db.execute(_TWO_COUNTERS, (previous_key, current_key, now))}
        previous, current = counts.get(previous_key, 0), counts.get(current_key, 0)
        left = expiry - now % expiry  # seconds until the current window ends
        return previous, (left if previous else 0.0), current, left + expiry
