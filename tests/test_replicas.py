"""What holds across three `qpu-gateway serve` replicas on one PostgreSQL database: rate limits shared
through Redis (and refused, never waved through, while Redis is down), revocation, one policy.

tests/test_replicas_postgres.py has the rest (budgets, claims, the chain, notifications, restarts)."""

from __future__ import annotations

import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from qpu_gateway.config import Database

from .databases import create_postgres, drop_postgres
from .replicas import open_db, own_redis, prepare, replicas, restart_redis
from .support import body, eventually, http_client, new_key, stop_process

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }
"""


@pytest.fixture
def db() -> Iterator[str]:
    """The database every replica serves: a fresh PostgreSQL database of this test's own."""
    url = create_postgres()
    try:
        yield url
    finally:
        drop_postgres(url)


def write_policy(folder: Path, text: str = "") -> Path:
    path = folder / "policy.toml"
    path.write_text(POLICY + text, encoding="utf-8")
    return path


async def make_key(db: str, agent: str) -> str:
    prepare(db)
    return await new_key(Database.parse(db), agent)


async def calls(url: str, key: str, tool: str, count: int) -> list[dict[str, Any]]:
    """`count` concurrent calls of `tool` through one client session; each answer's body."""
    answers: list[dict[str, Any]] = []
    async with http_client(url, key) as client:

        async def one() -> None:
            answers.append(body(await client.call_tool(tool, {})))

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
    return answers


def rate_rule(tools: str = '["get_usage"]', limit: str = "20/minute") -> str:
    # A fresh counter name per run: Redis keeps counts between runs and between tests.
    return f'rate_limits = [{{ name = "r-{uuid.uuid4().hex[:10]}", limit = "{limit}", tools = {tools} }}]\n'


async def test_a_per_agent_rate_limit_admits_exactly_its_count_across_three_replicas_sharing_redis(
    db: str, tmp_path: Path
) -> None:
    write_policy(tmp_path, rate_rule(limit="20/minute"))
    key = await make_key(db, "alice")
    with replicas(db, tmp_path, QPU_GATEWAY_RATE_STORAGE="async+redis://127.0.0.1:6379") as running:
        answers: list[dict[str, Any]] = []

        async def spread(url: str) -> None:
            answers.extend(await calls(url, key, "get_usage", 15))

        async with anyio.create_task_group() as tg:
            for replica in running:
                tg.start_soon(spread, replica.url)
    assert len(answers) == 45
    assert Counter(a.get("code", "ok") for a in answers) == {"ok": 20, "rate_limited": 25}


async def test_with_redis_down_calls_that_need_a_limit_are_refused_unavailable_and_resume_when_it_is_back(
    db: str, tmp_path: Path
) -> None:
    write_policy(tmp_path, rate_rule(limit="1000/minute"))
    key = await make_key(db, "alice")
    with own_redis() as (uri, redis), replicas(db, tmp_path, 1, QPU_GATEWAY_RATE_STORAGE=uri) as (replica,):
        async with http_client(replica.url, key) as client:
            before = await client.call_tool("get_usage", {})
            stop_process(redis)
            down = [await client.call_tool("get_usage", {}) for _ in range(3)]
            unlimited = await client.call_tool("list_backends", {})  # no rule counts it: Redis is not asked
            back = restart_redis(uri)
            try:

                async def admitted_again() -> bool:
                    return not (await client.call_tool("get_usage", {})).is_error

                await eventually(admitted_again, within_s=20, every=0.5)
            finally:
                stop_process(back)
    assert not before.is_error and not unlimited.is_error
    for answer in down:
        refused = body(answer)
        assert refused["code"] == "unavailable" and refused["retry_after_s"] > 0
        assert "rate-limit storage" in refused["message"] and "127.0.0.1" not in refused["message"]
    store = await open_db(db)
    try:
        rows = [r for r in await store.audit_tail(limit=200) if r.tool == "get_usage"]
    finally:
        await store.close()
    assert [r.error_code for r in rows].count("unavailable") >= 3  # each refusal audited
    assert all(r.decision == "error" for r in rows if r.error_code == "unavailable")  # not run, not admitted


@asynccontextmanager
async def watched_client(url: str, key: str, mode: str, refusals: list[dict[str, Any]]) -> AsyncIterator[Client]:
    """A real client session whose HTTP layer notes the body of every 401 it receives."""

    async def note(response: httpx2.Response) -> None:
        if response.status_code == 401:
            refusals.append({"url": str(response.url), **json.loads(await response.aread())})

    headers = {"Authorization": f"Bearer {key}"}
    timeout = httpx2.Timeout(30, read=300)
    async with (
        httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks={"response": [note]}) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        yield client


async def test_a_key_revoked_on_one_replica_is_refused_at_the_next_call_on_every_replica(
    db: str, tmp_path: Path
) -> None:
    write_policy(tmp_path)
    key = await make_key(db, "carol")
    other = await make_key(db, "dave")
    refusals: list[dict[str, Any]] = []
    with replicas(db, tmp_path) as running:
        async with (
            watched_client(running[0].url, key, "legacy", refusals) as a,  # a 2025-11-25 session
            watched_client(running[1].url, key, "2026-07-28", refusals) as b,
            watched_client(running[2].url, key, "2026-07-28", refusals) as c,
            http_client(running[2].url, other) as bystander,
        ):
            for client in (a, b, c):
                assert not (await client.call_tool("get_usage", {})).is_error
            revoke = await anyio.run_process(
                [sys.executable, "-m", "qpu_gateway", "keys", "revoke", key.split("_")[1], "--db", db]
            )
            assert revoke.returncode == 0
            for client in (a, b, c):
                with pytest.raises(Exception, match="error response"):  # the SDK's words for an HTTP error
                    await client.call_tool("get_usage", {})
            still = await bystander.call_tool("get_usage", {})
    # The next call on each replica met the key gate's 401, with the coded body.
    assert sorted(r["url"] for r in refusals[:3]) == sorted(r.url for r in running)
    assert all(r["code"] == "unauthorized" and "revoked" in r["message"] for r in refusals)
    assert not still.is_error


async def processes_listing(db: str) -> tuple[int, dict[str, Any]]:
    """`qpu-gateway processes --json`: its exit status and what it printed."""
    done = await anyio.run_process(
        [sys.executable, "-m", "qpu_gateway", "processes", "--json", "--db", db], check=False
    )
    return done.returncode, json.loads(done.stdout)


async def policy_consistency(url: str, key: str) -> dict[str, Any]:
    async with http_client(url, key) as client:
        read = await client.read_resource("qpu://policy")
    return dict(json.loads(read.contents[0].text)["consistency"])


async def test_a_replica_given_another_policy_file_is_shown_to_the_operator_and_the_agent(
    db: str, tmp_path: Path
) -> None:
    shared = write_policy(tmp_path, "max_shots = 4000\n")
    (tmp_path / "odd").mkdir()
    odd = write_policy(tmp_path / "odd", "max_shots = 100\n")  # a stale copy on one machine
    key = await make_key(db, "alice")
    with replicas(db, tmp_path, policies=[shared, shared, odd]) as running:

        async def everyone_reported() -> bool:
            return len((await processes_listing(db))[1]["processes"]) == 3

        await eventually(everyone_reported, within_s=20, every=0.5)
        status, listing = await processes_listing(db)
        seen = await policy_consistency(running[0].url, key)

        async def warned() -> bool:
            return any("do not run the same policy" in r.log.read_text(encoding="utf-8") for r in running)

        await eventually(warned, within_s=20, every=0.5)
        odd.write_text(shared.read_text(encoding="utf-8"), encoding="utf-8")  # the operator ships the right file

        async def agreed() -> bool:
            return (await processes_listing(db))[0] == 0

        await eventually(agreed, within_s=20, every=0.5)
        after = await policy_consistency(running[2].url, key)
    assert status == 1 and listing["agree"] is False
    differing = [p for p in listing["processes"] if not p["same_policy"]]
    assert [p["pid"] for p in differing] == [running[2].process.pid]
    assert differing[0]["policy_path"] == str(odd)
    assert seen["agree"] is False and seen["policies"] == 2 and seen["processes"] == 3 and seen["warning"]
    assert after["agree"] is True and after["policies"] == 1 and after["warning"] is None
