"""Shared fixtures: a real database (SQLite file, or PostgreSQL), a running gateway, keys, and a gateway over HTTP.

`config` is on SQLite unless a test parametrises `db_backend` (`@pytest.mark.parametrize("db_backend",
BACKENDS)`): then the same test also runs on a fresh PostgreSQL database with Redis rate limits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .databases import REDIS_STORAGE, database_of
from .support import HttpServer, new_key, start_http_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The tests' own policy: the caps of the default, without its rate limits, budget or approvals,
# so each test that is about one of those turns it on itself.
TEST_POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }

[prices."faulty/*"]
model = "free"
"""


@pytest.fixture
def db_backend() -> str:
    """The database `config` is on: SQLite, unless a test parametrises this with `BACKENDS`."""
    return "sqlite"


@pytest.fixture
def config(tmp_path: Path, db_backend: str) -> Iterator[Config]:
    """A gateway configuration on a fresh database, with short timings so tests run fast."""
    (tmp_path / "policy.toml").write_text(TEST_POLICY, encoding="utf-8")
    with database_of(db_backend, tmp_path) as database:
        yield Config(
            database=database,
            policy_path=tmp_path / "policy.toml",
            data_dir=tmp_path,
            lease_s=3.0,
            poll_interval_s=0.1,
            retry_base_s=0.01,
            rate_storage=REDIS_STORAGE if database.is_postgres else None,
        )


@pytest.fixture
async def gateway(config: Config) -> AsyncIterator[Gateway]:
    gw = Gateway(config)
    async with gw.running():
        yield gw


@pytest.fixture
async def alice_key(config: Config) -> str:
    return await new_key(config.database, "alice")


@pytest.fixture
async def bob_key(config: Config) -> str:
    return await new_key(config.database, "bob")


@pytest.fixture
def http_server(config: Config) -> Iterator[HttpServer]:
    server = start_http_server(config)
    yield server
    server.stop()
