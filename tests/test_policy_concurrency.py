"""Policy under concurrency, across real server processes on one database, and the ledger's bookkeeping.

On PostgreSQL too: the budget raced by 200 submits over two processes, and the rate limit shared by
two processes (in Redis, the only kind of storage a PostgreSQL store accepts). Every way a job ends
settling its reservation is the store's (tests/test_store.py runs it on both backends), and the policy
file's reload does not touch the store: those two run on SQLite only, to keep the suite short.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from typing import Any

import anyio
import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.approvals import deny
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import TERMINAL
from qpu_gateway.store import open_store

from .databases import BACKENDS
from .support import BELL2, body, eventually, http_client, in_memory, start_http_server

pytestmark = pytest.mark.anyio


def write_policy(config: Config, text: str) -> None:
    config.policy_path.write_text(
        '[defaults]\nallowed_backends = ["aer/*", "faulty/*"]\n'
        "loop_guard = { max_repeats = 100000, window_minutes = 1 }\n" + text,
        encoding="utf-8",
    )


async def totals(config: Config, agent: str = "alice") -> tuple[dict[str, Any], dict[str, Any]]:
    store = await open_store(config.database)
    try:
        result = await store.ledger_totals("agent", agent, time.time())
    finally:
        await store.close()
    return result.committed, result.reserved


async def fire(url: str, key: str, tool: str, args: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """`count` concurrent calls of one tool through one real HTTP client session."""
    answers: list[dict[str, Any]] = []
    async with http_client(url, key) as client:

        async def one() -> None:
            result = await client.call_tool(tool, args)
            answers.append({"error": result.is_error, **body(result)})

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
    return answers


@pytest.mark.slow
@pytest.mark.parametrize(
    ("storage", "db_backend"), [("sqlite", "sqlite"), ("redis", "sqlite"), ("redis", "postgresql")]
)
async def test_a_rate_limit_admits_exactly_its_count_across_two_processes(
    config: Config, alice_key: str, storage: str
) -> None:
    rule = f"burst-{uuid.uuid4().hex[:8]}"  # a fresh counter, whatever an earlier run left in Redis
    write_policy(config, f'rate_limits = [{{ name = "{rule}", limit = "30/minute", tools = ["get_usage"] }}]')
    env = {"QPU_GATEWAY_RATE_STORAGE": "async+redis://127.0.0.1:6379"} if storage == "redis" else {}
    servers = [start_http_server(config, **env), start_http_server(config, **env)]
    try:
        results: list[list[dict[str, Any]]] = [[], []]

        async def run(index: int) -> None:
            results[index] = await fire(servers[index].url, alice_key, "get_usage", {}, 50)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, 0)
            tg.start_soon(run, 1)
    finally:
        for server in servers:
            server.stop()
    answers = results[0] + results[1]
    assert len(answers) == 100
    assert Counter(a.get("code", "ok") for a in answers) == {"ok": 30, "rate_limited": 70}


@pytest.mark.slow
@pytest.mark.parametrize("db_backend", BACKENDS)
async def test_200_concurrent_submits_against_a_budget_for_50_admit_exactly_50(config: Config, alice_key: str) -> None:
    write_policy(
        config,
        'agent_quota = { cost_usd = { day = "5.00" } }\n'
        '[prices."faulty/*"]\nmodel = "per_task_shot"\nper_task_usd = "0.10"\nper_shot_usd = "0"\n',
    )
    servers = [start_http_server(config, QPU_GATEWAY_FAULTS="ok"), start_http_server(config, QPU_GATEWAY_FAULTS="ok")]
    args = {"circuit": BELL2, "backend": "faulty/qpu", "shots": 10}
    try:
        results: list[dict[str, Any]] = []

        async def run(url: str) -> None:
            results.extend(await fire(url, alice_key, "submit_job", args, 50))

        async with anyio.create_task_group() as tg:
            for server in servers:
                tg.start_soon(run, server.url)
                tg.start_soon(run, server.url)
        admitted = [r["job_id"] for r in results if not r["error"]]
        store = await open_store(config.database)
        try:

            async def all_done() -> bool:
                jobs = [await store.get_job(j) for j in admitted]
                return all(j is not None and j.state in TERMINAL for j in jobs)

            await eventually(all_done, within_s=120)
        finally:
            await store.close()
    finally:
        for server in servers:
            server.stop()
    assert Counter(r.get("code", "ok") for r in results) == {"ok": 50, "quota_exhausted": 150}
    committed, reserved = await totals(config)
    assert committed["day"][0] == 50 * 100_000 == 5_000_000  # exact to the micro-dollar
    assert reserved == {}


async def test_every_way_a_job_ends_returns_its_reservation(config: Config, alice_key: str) -> None:
    # $0.001 a shot: 100 shots = $0.10 (runs at once), 10,000 shots = $10 (needs a person's yes).
    write_policy(
        config,
        'confirm_above_usd = "5.00"\napproval_ttl = "2s"\nagent_quota = { cost_usd = { day = "25.00" } }\n'
        '[prices."faulty/*"]\nmodel = "per_task_shot"\nper_task_usd = "0"\nper_shot_usd = "0.001"\n',
    )
    gateway = Gateway(
        Config(
            **{
                **config.__dict__,
                "faults": "permanent,quota,slow:60",
                "per_backend_concurrency": 1,
                "approval_sweep_s": 0.2,
            }
        )
    )
    small = {"circuit": BELL2, "backend": "faulty/qpu", "shots": 100}
    async with gateway.running(), in_memory(gateway, alice_key) as client:

        async def submit(args: dict[str, Any]) -> Any:
            return await client.call_tool("submit_job", args)

        async def finish(job_id: str) -> dict[str, Any]:
            done = await client.call_tool("wait_for_job", {"job_id": job_id})
            return dict(done.structured_content or {})

        async def state(job_id: str, wanted: str) -> None:
            async def reached() -> bool:
                job = await gateway.store.get_job(job_id)
                return job is not None and job.state.value == wanted

            await eventually(reached)

        permanent = body(await submit(small))["job_id"]
        assert (await finish(permanent))["error"]["code"] == "provider_error"
        provider_quota = body(await submit(small))["job_id"]
        assert (await finish(provider_quota))["error"]["code"] == "quota_exhausted"
        running = body(await submit(small))["job_id"]
        await state(running, "submitting")
        queued = body(await submit(small))["job_id"]  # one at a time: it waits
        assert (await client.call_tool("cancel_job", {"job_id": queued})).structured_content["state"] == "cancelled"
        assert (await client.call_tool("cancel_job", {"job_id": running})).structured_content["state"] == "cancelled"
        denied = body(await submit({**small, "shots": 10_000}))["job_id"]
        await deny(gateway.store, denied, by="ops", reason="too dear")
        expiring = body(await submit({**small, "shots": 10_000}))["job_id"]
        assert (await finish(expiring))["state"] == "expired"
        over_budget = await submit({**small, "shots": 30_000})  # $30 against a $25 budget: refused
        succeeded = body(await submit(small))["job_id"]
        assert (await finish(succeeded))["state"] == "succeeded"
        assert (await finish(denied))["state"] == "rejected"
    assert body(over_budget)["code"] == "quota_exhausted"
    committed, reserved = await totals(config)
    assert reserved == {}
    assert committed["day"][0] == 100_000  # only the job that succeeded is charged


async def test_a_policy_edit_reaches_a_running_server_process(config: Config, alice_key: str) -> None:
    server = start_http_server(config)
    try:
        async with http_client(server.url, alice_key) as client:
            before = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 500})
            write_policy(config, "max_shots = 100\n")

            async def refused() -> bool:
                answer = await client.call_tool("estimate_job", {"circuit": BELL2, "shots": 500})
                return bool(answer.is_error)

            await eventually(refused, within_s=10, every=0.25)
    finally:
        server.stop()
    assert not before.is_error
