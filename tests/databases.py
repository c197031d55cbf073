"""The databases tests run on: a SQLite file in tmp_path, or a fresh PostgreSQL database of its own.

Each PostgreSQL test gets a database with a random name on the local server (127.0.0.1:5432, trust
auth), dropped afterwards, so engineers running the suite side by side, and reruns, never meet.
Rate limits of a PostgreSQL gateway are counted in the local Redis (a PostgreSQL store refuses to
start without a shared storage); its keys carry the database's installation id, so tests never
share counts either.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg

from qpu_gateway.config import Database

BACKENDS = ["sqlite", "postgresql"]
# The server the PostgreSQL tests use, and its maintenance database (where databases are made).
PG_SERVER = os.environ.get("QPU_TEST_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_STORAGE = os.environ.get("QPU_TEST_REDIS_STORAGE", "async+redis://127.0.0.1:6379/0")


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)


def create_postgres(prefix: str = "qpg_test") -> str:
    """A new, empty database on the test server; its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with _admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{PG_SERVER}/{name}"


def drop_postgres(url: str) -> None:
    """Drop a database `create_postgres` made, closing whatever connections are left on it."""
    name = url.rsplit("/", 1)[1]
    with _admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_of(backend: str, tmp_path: Path, name: str = "gateway.db") -> Iterator[Database]:
    """A database of `backend` for one test: a file in `tmp_path`, or a fresh PostgreSQL database."""
    if backend == "sqlite":
        yield Database(path=tmp_path / name)
        return
    url = create_postgres()
    try:
        yield Database(url=url)
    finally:
        drop_postgres(url)


def location(database: Database) -> str:
    """What `--db` and QPU_GATEWAY_DB take for this database."""
    return database.url if database.url is not None else str(database.path)


def query(database: Database, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows read straight from the database (not through the store); `?` placeholders on both."""
    if database.url is None:
        assert database.path is not None
        with closing(sqlite3.connect(database.path)) as db:
            return db.execute(sql, tuple(params)).fetchall()
    with psycopg.connect(database.url, autocommit=True) as conn:
        return conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall()  # type: ignore[arg-type]


def execute(database: Database, sql: str, params: Sequence[Any] = ()) -> None:
    """One statement run straight on the database, committed (for tests that tamper with rows)."""
    if database.url is None:
        assert database.path is not None
        with closing(sqlite3.connect(database.path)) as db:
            db.execute(sql, tuple(params))
            db.commit()
        return
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute(sql.replace("?", "%s"), tuple(params))  # type: ignore[arg-type]
