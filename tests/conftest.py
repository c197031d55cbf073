"""Shared fixtures: a real SQLite file, a running gateway, keys, and a gateway over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

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
def config(tmp_path: Path) -> Config:
    """A gateway configuration on a fresh SQLite file, with short timings so tests run fast."""
    (tmp_path / "policy.toml").write_text(TEST_POLICY, encoding="utf-8")
    return Config(
        db_path=tmp_path / "gateway.db",
        policy_path=tmp_path / "policy.toml",
        lease_s=3.0,
        poll_interval_s=0.1,
        retry_base_s=0.01,
    )


@pytest.fixture
async def gateway(config: Config) -> AsyncIterator[Gateway]:
    gw = Gateway(config)
    async with gw.running():
        yield gw


@pytest.fixture
async def alice_key(config: Config) -> str:
    return await new_key(config.db_path, "alice")


@pytest.fixture
async def bob_key(config: Config) -> str:
    return await new_key(config.db_path, "bob")


@pytest.fixture
def http_server(config: Config) -> Iterator[HttpServer]:
    server = start_http_server(config)
    yield server
    server.stop()
