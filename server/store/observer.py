"""The one hook through which a store reports its work: each SQL statement, each round trip.

Nothing observes a gateway in normal running: each report is then one `None` check, and a store
opens its connections without a trace. The bench's statement counter (`bench/statements.py`)
installs an observer before the gateway opens its store; from then on every store (and the
rate-limit storage) reports:

- `statement(sql)`: one SQL statement the database ran, transaction control (BEGIN, COMMIT,
  SAVEPOINT, RELEASE, ROLLBACK) included. SQLite reports through `sqlite3`'s trace callback on
  each of its connections; a PostgreSQL store reports each statement it sends.
- `round_trip(kind)`: one wait on the database. `"hop"`: work handed to a connection's own
  thread and its answer awaited (SQLite through aiosqlite), or one exchange over the network
  (PostgreSQL: a query, or a pipeline's sync). `"direct"`: a call into the database on the
  caller's own thread, with no hand-over (SQLite's loop-thread connections).

Each report names the store call it belongs to (`admit`, `get_job`, `rate_limit.acquire_entry`,
...): the `operations` class decorator names every public coroutine method, and the name
travels with the work to whatever thread runs it (`carried`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from contextvars import ContextVar, copy_context
from typing import Any, Literal, Protocol, TypeVar

RoundTrip = Literal["hop", "direct"]
C = TypeVar("C", bound=type)
T = TypeVar("T")


class StoreObserver(Protocol):
    """Told of every statement and round trip, from any thread (it must be thread-safe)."""

    def statement(self, operation: str | None, sql: str) -> None: ...

    def round_trip(self, operation: str | None, kind: RoundTrip) -> None: ...


_observer: StoreObserver | None = None
# The store call running in this context: set by `operations`, carried to a connection's thread by `carried`.
_operation: ContextVar[str | None] = ContextVar("qpu_gateway_store_operation", default=None)


def install(observer: StoreObserver | None) -> None:
    """Report to `observer` from now on (None: to nobody). Connections opened before this are not traced."""
    global _observer
    _observer = observer


def current() -> StoreObserver | None:
    """The observer, if one is installed: a store asks when it opens a connection."""
    return _observer


def statement(sql: str) -> None:
    """Report one statement (a `sqlite3` trace callback, or a driver's execute)."""
    observer = _observer
    if observer is not None:
        observer.statement(_operation.get(), sql)


def round_trip(kind: RoundTrip) -> None:
    """Report one round trip of the store call running in this context."""
    observer = _observer
    if observer is not None:
        observer.round_trip(_operation.get(), kind)


def carried(work: Callable[..., T]) -> Callable[..., T]:
    """`work`, run under the caller's store operation on whatever thread runs it (unchanged when
    nothing observes)."""
    if _observer is None:
        return work
    context = copy_context()
    return lambda *args: context.run(work, *args)


def operations(prefix: str = "") -> Callable[[C], C]:
    """Name each public coroutine method of a store class as the operation its reports belong to.

    A call made inside another keeps the outer name (`claim` calling `claim_many` is `claim`).
    """

    def decorate(cls: C) -> C:
        for name, method in list(vars(cls).items()):
            if not name.startswith("_") and inspect.iscoroutinefunction(method):
                setattr(cls, name, _named(prefix + name, method))
        return cls

    return decorate


def _named(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def run(*args: Any, **kwargs: Any) -> Any:
        if _observer is None or _operation.get() is not None:
            return await method(*args, **kwargs)
        token = _operation.set(name)
        try:
            return await method(*args, **kwargs)
        finally:
            _operation.reset(token)

    return run
