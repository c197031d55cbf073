"""The psycopg 3 driver behind the PostgreSQL store: a connection pool, pipeline mode, LISTEN.

Every transaction runs in pipeline mode: statements whose results are not needed yet are sent
without waiting, and go to the server with the next statement that reads, so an admission's
reads are one round trip and its writes with the commit another (see `bench/store_drivers.py`
for what that buys over asyncpg, which waits for each statement).

The pool opens connections in the background and makes them again when the server comes back:
while it is down, a call waits at most `connect_timeout_s` for a connection and is then answered
`unavailable`; a connection that broke (a restarted server) fails its call the same way, is thrown
away, and the pool's other idle connections are checked at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import psycopg
import psycopg.conninfo
from psycopg import errors
from psycopg import sql as pgsql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from qpu_gateway.store import StoreError, observer
from qpu_gateway.store.pg_connector import UNAVAILABLE, UNAVAILABLE_RETRY_S, Params, Retry, Row, Statement
from qpu_gateway.telemetry.logs import redact

log = logging.getLogger(__name__)

# Connections per gateway process (plus one that listens): a few replicas stay far below the
# server's default max_connections of 100. Tunable for an operator with many replicas.
ENV_POOL_SIZE = "QPU_GATEWAY_PG_POOL_SIZE"
DEFAULT_POOL_SIZE = 4
_LISTEN_RETRY_MAX_S = 5.0
_RECONNECT_RUN_S = 2.0


class _PsycopgTx:
    """A connection's statements, each reported to the store's observer as it is sent, and each
    exchange with the server as a round trip: in pipeline mode a statement whose rows are read
    waits for everything sent before it (one exchange), a statement whose result is not needed
    travels with the next exchange; outside a pipeline every statement is an exchange."""

    def __init__(self, conn: psycopg.AsyncConnection[Row], *, pipelined: bool = False) -> None:
        self._conn = conn
        self._pipelined = pipelined

    async def run(self, sql: str, params: Params = ()) -> None:
        observer.statement(sql)
        await self._conn.execute(sql, params or None)
        if not self._pipelined:
            observer.round_trip("hop")

    async def one(self, sql: str, params: Params = ()) -> Row | None:
        observer.statement(sql)
        cursor = await self._conn.execute(sql, params or None)
        row = await cursor.fetchone()
        observer.round_trip("hop")
        return row

    async def all(self, sql: str, params: Params = ()) -> list[Row]:
        observer.statement(sql)
        cursor = await self._conn.execute(sql, params or None)
        rows = await cursor.fetchall()
        observer.round_trip("hop")
        return rows

    async def many(self, statements: Sequence[Statement]) -> list[list[Row]]:
        cursors = []
        for sql, params in statements:
            observer.statement(sql)
            cursors.append(await self._conn.execute(sql, params or None))
            if not self._pipelined:
                observer.round_trip("hop")
        results = [await cursor.fetchall() for cursor in cursors]
        if self._pipelined and statements:
            observer.round_trip("hop")  # sent together, read back together: one exchange
        return results

    async def script(self, sql: str) -> None:
        observer.statement(sql)
        await self._conn.execute(sql.encode())  # bytes: no placeholder parsing, simple query protocol
        observer.round_trip("hop")


@asynccontextmanager
async def _transaction(conn: psycopg.AsyncConnection[Row], *, pipelined: bool) -> AsyncIterator[_PsycopgTx]:
    """`conn.transaction()` with its BEGIN and COMMIT (or ROLLBACK) reported; in pipeline mode
    BEGIN goes with the first exchange and COMMIT is the last one (the pipeline's sync)."""
    observer.statement("BEGIN")
    if not pipelined:
        observer.round_trip("hop")
    ended = "ROLLBACK"
    try:
        async with conn.transaction():
            yield _PsycopgTx(conn, pipelined=pipelined)
            ended = "COMMIT"
    finally:
        observer.statement(ended)
        observer.round_trip("hop")


class PsycopgConnector:
    name = "psycopg"

    def __init__(self, url: str, *, connect_timeout_s: float, pipeline: bool = True) -> None:
        self._url = url
        self._pipeline = pipeline  # off only to measure what it buys (bench/store_drivers.py)
        self._timeout = connect_timeout_s
        size = int(os.environ.get(ENV_POOL_SIZE) or DEFAULT_POOL_SIZE)
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Row]] = AsyncConnectionPool(
            url,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": max(1, int(connect_timeout_s))},
            min_size=1,
            max_size=max(1, size),
            open=False,
            timeout=connect_timeout_s,
            max_idle=60.0,
            # psycopg_pool retries a lost connection after 1, 2, 4, 8 ... s without a ceiling: after an
            # outage of a minute its next try could be a minute after the server is back, every call
            # answered `unavailable` meanwhile. So each run of retries stops after a few seconds, and
            # the next call that needs a connection starts a new one at once: a server down for long
            # is still waited for, and found again within about a second of its return.
            reconnect_timeout=_RECONNECT_RUN_S,
            name="qpu-gateway",
        )
        self._suspect = False  # a connection was found broken: check the idle ones before the next use

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_PsycopgTx]:
        with self._errors():
            await self._check_if_suspect()
            async with self._pool.connection() as conn:
                if not self._pipeline:
                    async with _transaction(conn, pipelined=False) as tx:
                        yield tx
                    return
                async with conn.pipeline(), _transaction(conn, pipelined=True) as tx:
                    yield tx

    @asynccontextmanager
    async def scripting(self) -> AsyncIterator[_PsycopgTx]:
        with self._errors():
            async with self._pool.connection() as conn, _transaction(conn, pipelined=False) as tx:
                yield tx

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[_PsycopgTx]:
        with self._errors():
            await self._check_if_suspect()
            async with self._pool.connection() as conn:
                yield _PsycopgTx(conn)

    async def _check_if_suspect(self) -> None:
        """After a broken connection, have the pool test its idle ones (one query each) and drop the dead."""
        if self._suspect:
            self._suspect = False
            await self._pool.check()  # not counted: only after a lost connection, never on a job's path

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (errors.DeadlockDetected, errors.SerializationFailure) as exc:
            raise Retry(str(exc)) from None
        except (PoolTimeout, psycopg.OperationalError) as exc:
            # The server went away under a pooled connection, or none can be had: the others the
            # pool holds idle are probably as dead, so have them checked now, not at their next use.
            log.warning("database unavailable: %s", redact(str(exc)).strip())
            self._suspect = True
            raise StoreError(UNAVAILABLE, retry_after_s=UNAVAILABLE_RETRY_S, kind="unavailable") from None
        except psycopg.Error as exc:
            raise StoreError(f"database error: {redact(str(exc)).strip()}") from None

    async def listen(
        self, channel: str, on_notify: Callable[[str], Awaitable[None]], on_connected: Callable[[], Awaitable[None]]
    ) -> None:
        wait = 0.2
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=max(1, int(self._timeout))
                )
            except psycopg.Error as exc:
                log.warning("cannot listen for job changes (retrying in %.1f s): %s", wait, redact(str(exc)).strip())
                await anyio.sleep(wait)
                wait = min(wait * 2, _LISTEN_RETRY_MAX_S)
                continue
            try:
                async with conn:
                    observer.statement(f"LISTEN {channel}")
                    await conn.execute(f"LISTEN {channel}")
                    observer.round_trip("hop")
                    wait = 0.2
                    await on_connected()
                    async for notify in conn.notifies():
                        await on_notify(notify.payload)
            except psycopg.Error as exc:
                log.warning("lost the job-change listener, reconnecting: %s", redact(str(exc)).strip())
                await anyio.sleep(wait)


def connect(url: str, *, connect_timeout_s: float) -> PsycopgConnector:
    return PsycopgConnector(url, connect_timeout_s=connect_timeout_s)


def _missing(exc: psycopg.Error) -> bool:
    """Whether a failed connection failed because the database does not exist (SQLSTATE 3D000);
    libpq reports a refused connection's reason as text only."""
    return exc.sqlstate == "3D000" or ("database" in str(exc) and "does not exist" in str(exc))


def probe(url: str, query: str, *, timeout_s: float) -> list[tuple[Any, ...]] | None:
    """Run one read on a short-lived blocking connection (for `store_initialised`, before any loop);
    None when the database does not exist."""
    try:
        with psycopg.connect(url, connect_timeout=max(1, int(timeout_s)), autocommit=True) as conn:
            return conn.execute(query).fetchall()
    except psycopg.Error as exc:
        if _missing(exc):
            return None
        log.warning("cannot reach the database: %s", redact(str(exc)).strip())
        raise StoreError(UNAVAILABLE, retry_after_s=UNAVAILABLE_RETRY_S, kind="unavailable") from None


def create_database(url: str, *, timeout_s: float) -> bool:
    """Create the URL's database if it does not exist, through the server's `postgres` database (as
    `createdb` does); True if it was created. Needs the CREATEDB privilege."""
    if probe(url, "SELECT 1", timeout_s=timeout_s) is not None:
        return False
    name = str(psycopg.conninfo.conninfo_to_dict(url).get("dbname"))
    maintenance = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    try:
        with psycopg.connect(maintenance, connect_timeout=max(1, int(timeout_s)), autocommit=True) as conn:
            conn.execute(pgsql.SQL("CREATE DATABASE {}").format(pgsql.Identifier(name)))
    except errors.DuplicateDatabase:
        return False  # another process created it a moment ago
    except psycopg.Error as exc:
        raise StoreError(f"cannot create the database {name!r}: {redact(str(exc)).strip()}") from None
    return True
