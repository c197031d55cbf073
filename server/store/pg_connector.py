"""The PostgreSQL driver seam: what `server/store/postgres.py` asks of a driver, and nothing more.

In the manner of procrastinate's connectors (`BaseConnector`: execute a query, fetch one, fetch
all, listen): the store's SQL and logic never name a driver. The gateway's driver is psycopg 3
(`server/store/pg_psycopg.py`); `bench/store_drivers.py` runs the same store over asyncpg to
compare them. SQL is written with `%s` placeholders; a driver with `$n` placeholders rewrites them.

A driver turns its own errors into two: `StoreError` with `retry_after_s` when the database cannot
be reached (down, restarting, every connection busy), and `Retry` when the server aborted the
transaction for a reason a second attempt clears (a deadlock, a serialization failure).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = dict[str, Any]
Params = Sequence[Any]
Statement = tuple[str, Params]

# What an agent is told while the database cannot be reached; nothing here says which host.
UNAVAILABLE = (
    "The gateway database is unavailable (down, restarting or out of connections); the call did not "
    "complete. Try again shortly."
)
UNAVAILABLE_RETRY_S = 2.0


class Retry(Exception):
    """The server rolled the transaction back (deadlock, serialization failure): run it again."""


class Tx(Protocol):
    """One connection inside a transaction (or, from `Connector.reading`, in autocommit)."""

    async def run(self, sql: str, params: Params = ()) -> None:
        """A statement whose result is not needed: with a pipelining driver it travels with the next read."""
        ...

    async def one(self, sql: str, params: Params = ()) -> Row | None: ...

    async def all(self, sql: str, params: Params = ()) -> list[Row]: ...

    async def many(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """Several statements that return rows (SELECT, or RETURNING), in order, and their rows in order:
        one round trip with a pipelining driver."""
        ...

    async def script(self, sql: str) -> None:
        """Several `;`-separated statements without parameters (a migration); only in `scripting`."""
        ...


class Connector(Protocol):
    name: str  # the driver, for benches and logs

    def transaction(self) -> AbstractAsyncContextManager[Tx]:
        """A pooled connection in one transaction, committed on a clean exit, rolled back otherwise."""
        ...

    def reading(self) -> AbstractAsyncContextManager[Tx]:
        """A pooled connection for plain reads, each statement on its own (autocommit)."""
        ...

    def scripting(self) -> AbstractAsyncContextManager[Tx]:
        """A transaction that may run scripts (no pipelining): for migrations."""
        ...

    async def listen(
        self, channel: str, on_notify: Callable[[str], Awaitable[None]], on_connected: Callable[[], Awaitable[None]]
    ) -> None:
        """LISTEN on `channel` on a connection of its own until cancelled: each payload to `on_notify`.

        The connection is made again whenever it is lost; `on_connected` runs after every (re)connect,
        so the caller can catch up on what was committed while nobody was listening.
        """
        ...

    async def close(self) -> None: ...
