"""Operator controls as an operator uses them: the `qpu-gateway` CLI in its own process, acting on
gateways that serve agents in other processes (stdio and Streamable HTTP) on the same database.

The provider in the cancel and drain stories is the fault-injecting `faulty/qpu` with its own
books (`provider.db`), whose `hold` fault keeps an accepted job running at the provider until it
is cancelled there: the books, not the gateway, say what the provider was asked and what it ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import sqlite3
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp_types import ElicitRequestParams, ElicitResult

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import JobState
from qpu_gateway.mcp.app import build_server
from qpu_gateway.store import open_store
from qpu_gateway.store.records import AuditRecord, JobRecord

from .conftest import TEST_POLICY
from .support import BELL2, eventually, gateway_cmd, http_client, in_memory, start_http_server, stdio_params

pytestmark = pytest.mark.anyio

# Who the operator is: the OS user these tests (and so the CLI they start) run as.
OPERATOR = pwd.getpwuid(os.geteuid()).pw_name
HARDWARE = "faulty/qpu"
# The tests' policy without a price for faulty/qpu: its jobs wait for an operator's approval.
UNPRICED = TEST_POLICY.replace('[prices."faulty/*"]\nmodel = "free"\n', "")


async def cli(config: Config, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`qpu-gateway ARGS --db ... --policy ...` in its own process, as an operator runs it (no
    gateway variables of ours in its environment unless given)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("QPU_GATEWAY_") and k != "SUDO_USER"}
    done = await anyio.run_process(
        gateway_cmd(*args, "--db", str(config.db_path), "--policy", str(config.policy_path)),
        env={**environment, **(env or {})},
        check=False,
    )
    return subprocess.CompletedProcess(args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def cli_ok(config: Config, *args: str, env: Mapping[str, str] | None = None) -> str:
    done = await cli(config, *args, env=env)
    assert done.returncode == 0, f"{args} exited {done.returncode}: {done.stderr}"
    return done.stdout


def body(result: Any) -> dict[str, Any]:
    """A tool result's JSON body (an error's coded body included), from its text content."""
    loaded: dict[str, Any] = json.loads(result.content[0].text)
    return loaded


async def stored_job(config: Config, job_id: str) -> JobRecord:
    store = await open_store(config.database)
    try:
        job = await store.get_job(job_id)
    finally:
        await store.close()
    assert job is not None
    return job


async def audit_rows(config: Config, **filters: Any) -> list[AuditRecord]:
    store = await open_store(config.database)
    try:
        return await store.audit_tail(limit=10_000, **filters)
    finally:
        await store.close()


def provider_books(directory: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(directory / "provider.db") as db:
        return db.execute(sql, params).fetchall()


async def wait_for_state(config: Config, job_id: str, state: JobState) -> JobRecord:
    async def reached() -> bool:
        return (await stored_job(config, job_id)).state is state

    await eventually(reached, within_s=60)
    return await stored_job(config, job_id)


# -- the agent's kill switch -------------------------------------------------------------------


async def test_an_agent_paused_in_the_cli_is_refused_at_its_next_call_in_a_running_server_until_resumed(
    config: Config, alice_key: str, bob_key: str
) -> None:
    async with (
        Client(stdio_params(config, alice_key)) as alice,  # type: ignore[arg-type]
        Client(stdio_params(config, bob_key)) as bob,  # type: ignore[arg-type]
    ):
        assert not (await alice.call_tool("get_usage", {})).is_error
        said = await cli_ok(config, "agents", "pause", "alice", "--reason", "runaway loop: 400 submits a minute")
        refused = [
            await alice.call_tool("get_usage", {}),
            await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10}),
        ]
        with pytest.raises(MCPError) as resource_refusal:
            await alice.read_resource("qpu://usage")
        listed = json.loads(await cli_ok(config, "agents", "list", "--json"))
        keys = await cli_ok(config, "keys", "list")
        bob_meanwhile = await bob.call_tool("get_usage", {})
        await cli_ok(config, "agents", "resume", "alice")
        resumed = await alice.call_tool("get_usage", {})

    assert "paused" in said
    for result in refused:
        assert result.is_error
        assert body(result)["code"] == "agent_paused"
        assert "runaway loop: 400 submits a minute" in body(result)["message"]
        assert "qpu-gateway agents resume alice" in body(result)["message"]
    assert "agent_paused" in str(resource_refusal.value)
    assert not bob_meanwhile.is_error and not resumed.is_error
    (alice_listed,) = [a for a in listed if a["agent"] == "alice"]
    assert alice_listed["paused"] is True and alice_listed["paused_by"] == OPERATOR
    assert alice_listed["reason"] == "runaway loop: 400 submits a minute"
    assert "(agent paused)" in next(line for line in keys.splitlines() if " alice " in line)

    rows = await audit_rows(config, agent="alice")
    acts = [(r.tool, r.operator) for r in rows if r.operator is not None]
    assert acts == [("agents.pause", OPERATOR), ("agents.resume", OPERATOR)]
    paused_calls = [(r.tool, r.decision) for r in rows if r.error_code == "agent_paused"]
    assert paused_calls == [
        ("get_usage", "refused"),
        ("submit_job", "refused"),
        ("resources/read:qpu://usage", "refused"),
    ]
    assert "intact" in await cli_ok(config, "audit", "verify")


async def test_a_paused_agent_is_refused_on_every_surface_and_its_person_is_never_asked(
    config: Config, alice_key: str
) -> None:
    config.policy_path.write_text(
        TEST_POLICY.replace("[defaults]\n", '[defaults]\nconfirm_above_usd = "1.00"\n').replace(
            'model = "free"', 'model = "per_task_shot"\nper_task_usd = "6.00"\nper_shot_usd = "0"'
        ),
        encoding="utf-8",
    )
    asked: list[str] = []

    async def elicitation(context: Any, params: ElicitRequestParams) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"approve": True})

    gateway = Gateway(Config(**{**config.__dict__, "faults": "ok"}))
    async with gateway.running():
        await cli_ok(config, "agents", "pause", "alice")
        server = build_server(gateway, lambda: alice_key)
        async with Client(server, mode="legacy", elicitation_callback=elicitation) as client:  # type: ignore[arg-type]
            submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
            listed = await client.call_tool("list_jobs", {})
            with pytest.raises(MCPError) as read:
                await client.read_resource("qpu://policy")
            with pytest.raises(MCPError) as subscribed:
                await client.subscribe_resource("qpu://jobs/job_00000000000000000000")
            with pytest.raises(MCPError) as prompt:
                await client.get_prompt("run_circuit", {})
        rows = [r for r in await audit_rows(config, agent="alice") if r.operator is None]

    assert asked == []  # nobody was asked to approve a paused agent's job
    assert body(submitted)["code"] == "agent_paused" and body(listed)["code"] == "agent_paused"
    for refusal in (read, subscribed, prompt):
        assert "agent_paused" in str(refusal.value)
    assert [(r.tool.partition(":")[0], r.error_code) for r in rows] == [
        ("submit_job", "agent_paused"),
        ("list_jobs", "agent_paused"),
        ("resources/read", "agent_paused"),
        ("resources/subscribe", "agent_paused"),
        ("run_circuit", "agent_paused"),
    ]


async def test_a_paused_agents_queued_jobs_wait_unclaimed_and_run_once_it_is_resumed(
    config: Config, alice_key: str, bob_key: str
) -> None:
    config.policy_path.write_text(UNPRICED, encoding="utf-8")
    server = start_http_server(config, QPU_GATEWAY_FAULTS="ok")
    try:
        async with http_client(server.url, alice_key) as alice, http_client(server.url, bob_key) as bob:
            held = [
                body(await alice.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "shots": 50 + i}))
                for i in range(2)
            ]
            await cli_ok(config, "agents", "pause", "alice", "--reason", "over budget")
            approved = [await cli_ok(config, "approvals", "approve", h["job_id"]) for h in held]
            over_http = await alice.call_tool("get_job", {"job_id": held[0]["job_id"]})
            # The worker keeps claiming: bob's job, queued after alice's, runs to its end meanwhile.
            bobs = body(await bob.call_tool("submit_job", {"circuit": BELL2, "shots": 20}))
            bobs_done = body(await bob.call_tool("wait_for_job", {"job_id": bobs["job_id"]}))
            await anyio.sleep(1.0)  # ten more claim rounds at the tests' 0.1 s poll
            while_paused = [await stored_job(config, h["job_id"]) for h in held]
            await cli_ok(config, "agents", "resume", "alice")
            after = [body(await alice.call_tool("wait_for_job", {"job_id": h["job_id"]})) for h in held]
    finally:
        server.stop()

    assert [h["code"] for h in held] == ["approval_required", "approval_required"]
    assert all("waits in the queue while agent alice is paused" in said for said in approved)
    assert body(over_http)["code"] == "agent_paused"  # a coded refusal, not an HTTP 401
    assert bobs_done["state"] == "succeeded"
    assert [(j.state, j.runs) for j in while_paused] == [(JobState.QUEUED, 0), (JobState.QUEUED, 0)]
    assert [a["state"] for a in after] == ["succeeded", "succeeded"]


# -- a backend's drain -------------------------------------------------------------------------


async def test_a_backend_paused_in_the_cli_is_drained_in_another_process_and_admission_says_why(
    config: Config, alice_key: str, tmp_path: Path
) -> None:
    # One running job at a time: the second job waits queued behind the first, held at the provider.
    config.policy_path.write_text(
        TEST_POLICY.replace("[defaults]\n", "[defaults]\nagent_quota = { running_jobs = 1 }\n"), encoding="utf-8"
    )
    books = tmp_path / "provider"
    server = start_http_server(config, QPU_GATEWAY_FAULTS="hold:3", QPU_GATEWAY_FAULTS_DIR=str(books))
    try:
        async with http_client(server.url, alice_key) as alice:
            first = body(await alice.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "shots": 30}))
            await wait_for_state(config, first["job_id"], JobState.RUNNING)
            second = body(await alice.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "shots": 31}))
            said = await cli_ok(config, "backends", "pause", HARDWARE, "--reason", "calibration until 14:00")
            refused = await alice.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "shots": 32})
            estimate = body(await alice.call_tool("estimate_job", {"circuit": BELL2, "backend": HARDWARE}))
            backends = body(await alice.call_tool("list_backends", {}))["backends"]
            simulator = await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 33})
            first_done = body(await alice.call_tool("wait_for_job", {"job_id": first["job_id"]}))
            await anyio.sleep(1.0)  # the running cap no longer holds the second job back; only the pause does
            second_paused = await stored_job(config, second["job_id"])
            listed = json.loads(await cli_ok(config, "backends", "list", "--json"))
            await cli_ok(config, "backends", "resume", HARDWARE)
            second_done = body(await alice.call_tool("wait_for_job", {"job_id": second["job_id"]}))
    finally:
        server.stop()

    assert "paused" in said
    assert body(refused)["code"] == "backend_paused" and "calibration until 14:00" in body(refused)["message"]
    assert estimate["admitted"] is False and estimate["refusal"]["code"] == "backend_paused"
    (faulty,) = [b for b in backends if b["id"] == HARDWARE]
    assert faulty["paused"] is True and "calibration until 14:00" in faulty["reason"]
    assert not any(b["paused"] for b in backends if b["id"] != HARDWARE)
    assert not simulator.is_error  # other backends are not drained
    assert first_done["state"] == "succeeded"  # already at the provider: it finishes
    assert second_paused.state is JobState.QUEUED and second_paused.runs == 0
    assert listed == [
        {
            "backend": HARDWARE,
            "waiting_jobs": 1,
            "running_jobs": 0,
            "paused": True,
            "paused_by": OPERATOR,
            "paused_at": listed[0]["paused_at"],
            "reason": "calibration until 14:00",
        }
    ]
    assert second_done["state"] == "succeeded"
    accepted = provider_books(books, "SELECT job_id FROM runs WHERE counts IS NOT NULL ORDER BY accepted_at")
    assert [row[0] for row in accepted] == [first["job_id"], second["job_id"]]  # the refused job never got there
    acts = [(r.tool, r.operator) for r in await audit_rows(config) if r.operator is not None]
    assert acts == [("backends.pause", OPERATOR), ("backends.resume", OPERATOR)]


# -- cancelling any agent's job ----------------------------------------------------------------


@pytest.mark.parametrize("canceller", ["operator", "its agent, through another server"])
async def test_a_job_running_in_another_server_process_is_stopped_and_cancelled_at_its_provider(
    config: Config, bob_key: str, tmp_path: Path, canceller: str
) -> None:
    books = tmp_path / "provider"
    faults = {"QPU_GATEWAY_FAULTS": "hold:120", "QPU_GATEWAY_FAULTS_DIR": str(books)}
    server = start_http_server(config, **faults)
    try:
        async with http_client(server.url, bob_key) as bob:
            job_id = body(await bob.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE}))["job_id"]
            running = await wait_for_state(config, job_id, JobState.RUNNING)
            if canceller == "operator":
                # No fault variables here: this process cannot reach the provider; the server's worker does.
                said = await cli_ok(config, "jobs", "cancel", job_id, "--reason", "runaway experiment")
            else:
                # Nor can that server: only the worker holding the job can tell the provider.
                async with Client(stdio_params(config, bob_key)) as elsewhere:  # type: ignore[arg-type]
                    said = json.dumps(body(await elsewhere.call_tool("cancel_job", {"job_id": job_id})))

            def cancelled_at_provider() -> list[tuple[Any, ...]]:
                return provider_books(books, "SELECT pid FROM calls WHERE job_id = ? AND outcome = 'cancel'", (job_id,))

            async def provider_was_told() -> bool:
                return server.process.pid in {row[0] for row in cancelled_at_provider()}

            await eventually(provider_was_told, within_s=30)
            seen_by_bob = body(await bob.call_tool("get_job", {"job_id": job_id}))
            await anyio.sleep(0.5)
            settled = await stored_job(config, job_id)
    finally:
        server.stop()

    assert running.lease_owner is not None and running.provider_ref is not None
    (run,) = provider_books(books, "SELECT counts, cancelled_at FROM runs WHERE job_id = ?", (job_id,))
    assert run[0] is None and run[1] is not None  # cancelled at the provider before it ever ran
    assert settled.state is JobState.CANCELLED and settled.lease_owner is None
    with sqlite3.connect(config.db_path) as db:
        (reservation,) = db.execute("SELECT status FROM ledger WHERE job_id = ?", (job_id,)).fetchone()
    assert reservation == "released"
    assert seen_by_bob["state"] == "cancelled"
    if canceller == "operator":
        assert f"Cancelled job {job_id} of agent bob (it was running on {HARDWARE})" in said
        assert seen_by_bob["error"] == {
            "code": "cancelled_by_operator",
            "message": "Cancelled by an operator: runaway experiment",
        }
        assert settled.cancelled_by == f"operator {OPERATOR}"
        (row,) = [r for r in await audit_rows(config, job_id=job_id) if r.tool == "jobs.cancel"]
        assert (row.operator, row.agent, row.decision) == (OPERATOR, "bob", "ok")
        assert row.detail == f"cancelled by operator {OPERATOR}: runaway experiment"
    else:
        assert seen_by_bob["error"] is None and settled.cancelled_by == "agent"
    assert "intact" in await cli_ok(config, "audit", "verify")


async def test_a_cancel_during_a_submission_lets_it_finish_then_cancels_what_the_provider_accepted(
    config: Config, alice_key: str, tmp_path: Path
) -> None:
    books = tmp_path / "provider"
    gateway = Gateway(Config(**{**config.__dict__, "faults": "slow:1.5", "faults_dir": books}))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        job_id = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE}))["job_id"]
        await wait_for_state(config, job_id, JobState.SUBMITTING)
        cancelled = body(await client.call_tool("cancel_job", {"job_id": job_id}))

        async def provider_was_told() -> bool:
            return bool(provider_books(books, "SELECT 1 FROM calls WHERE job_id = ? AND outcome = 'cancel'", (job_id,)))

        await eventually(provider_was_told, within_s=30)
        final = await stored_job(config, job_id)
    outcomes = provider_books(books, "SELECT outcome FROM calls WHERE job_id = ? ORDER BY id", (job_id,))
    assert cancelled["state"] == "cancelled"
    assert [row[0] for row in outcomes] == ["accepted", "cancel"]  # the submission was seen through, then cancelled
    assert final.state is JobState.CANCELLED and final.provider_ref is None


async def test_cancelling_a_job_that_ended_or_does_not_exist_exits_1_and_writes_nothing(
    config: Config, alice_key: str
) -> None:
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        job_id = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))["job_id"]
        await client.call_tool("wait_for_job", {"job_id": job_id})
    before = await audit_rows(config)
    ended = await cli(config, "jobs", "cancel", job_id, "--reason", "too late")
    unknown = await cli(config, "jobs", "cancel", "job_ffffffffffffffffffff", "--reason", "never was")
    blank = await cli(config, "jobs", "cancel", job_id, "--reason", "  ")

    assert ended.returncode == 1 and "already ended (succeeded)" in ended.stderr
    assert unknown.returncode == 1 and "No job 'job_ffffffffffffffffffff'" in unknown.stderr
    assert blank.returncode == 1 and "--reason" in blank.stderr
    assert await audit_rows(config) == before


# -- every operator act, audited ---------------------------------------------------------------


async def test_every_operator_act_is_an_audit_row_naming_the_os_user_and_the_chain_still_verifies(
    config: Config, tmp_path: Path
) -> None:
    config.policy_path.write_text(UNPRICED, encoding="utf-8")
    await cli_ok(config, "init")
    key = (await cli_ok(config, "keys", "create", "--agent", "alice", "--project", "lab")).strip()
    key_id = key.split("_")[1]
    await cli_ok(config, "keys", "rotate", key_id)
    spare = (await cli_ok(config, "keys", "create", "--agent", "alice", "--scopes", "read")).strip()
    await cli_ok(config, "keys", "revoke", spare.split("_")[1])
    await cli_ok(config, "quota", "set", "--agent", "alice", "agent_quota.cost_usd.day", "20")
    gateway = Gateway(Config(**{**config.__dict__, "faults": "ok"}))
    rotated = (await cli_ok(config, "keys", "rotate", key_id)).strip()
    async with gateway.running(workers=False), in_memory(gateway, rotated) as client:
        held = [
            body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "shots": n}))["job_id"]
            for n in (10, 11)
        ]
    await cli_ok(config, "approvals", "approve", held[0])
    await cli_ok(config, "approvals", "deny", held[1], "--reason", "too dear")
    await cli_ok(config, "agents", "pause", "alice", "--reason", "looping")
    again = await cli_ok(config, "agents", "pause", "alice", "--reason", "still looping")  # no change, no row
    await cli_ok(config, "agents", "resume", "alice")
    await cli_ok(config, "backends", "pause", "ibm/ibm_torino")
    await cli_ok(config, "backends", "resume", "ibm/ibm_torino")
    await cli_ok(config, "jobs", "cancel", held[0], "--reason", "wrong circuit")
    not_paused = await cli(config, "agents", "resume", "alice")

    rows = [r for r in await audit_rows(config) if r.operator is not None]
    tail = await cli_ok(config, "audit", "tail", "-n", "100")
    exported = [json.loads(line) for line in (await cli_ok(config, "audit", "export")).splitlines()]
    verified = await cli(config, "audit", "verify")

    assert "already paused" in again
    assert not_paused.returncode == 1 and "not paused" in not_paused.stderr
    assert [(r.tool, r.agent) for r in rows] == [
        ("keys.create", "local"),  # init's key
        ("keys.create", "alice"),
        ("keys.rotate", "alice"),
        ("keys.create", "alice"),
        ("keys.revoke", "alice"),
        ("quota.set", "alice"),
        ("keys.rotate", "alice"),
        ("approvals.approve", "alice"),
        ("approvals.deny", "alice"),
        ("agents.pause", "alice"),
        ("agents.resume", "alice"),
        ("backends.pause", None),
        ("backends.resume", None),
        ("jobs.cancel", "alice"),
    ]
    assert {r.operator for r in rows} == {OPERATOR}
    assert (rows[1].key_id, rows[1].project) == (key_id, "lab")
    assert "scopes cancel,estimate,read,submit, never expires" in (rows[1].detail or "")
    overrides = config.policy_path.with_name("policy.overrides.toml")
    assert hashlib.sha256(overrides.read_bytes()).hexdigest() in (rows[5].detail or "")
    assert "agents.alice.agent_quota.cost_usd.day = 20" in (rows[5].detail or "")
    assert "ibm/ibm_torino" in (rows[11].detail or "")
    assert [r.job_id for r in rows if r.tool.startswith(("approvals.", "jobs."))] == [held[0], held[1], held[0]]
    assert sum(f"operator={OPERATOR} " in line for line in tail.splitlines()) == len(rows)
    assert [e["tool"] for e in exported if e["operator"] == OPERATOR] == [r.tool for r in rows]
    assert verified.returncode == 0 and "chain intact" in verified.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="the sudo note is added only for root")
async def test_the_operator_is_read_from_the_uid_not_from_what_the_environment_claims(config: Config) -> None:
    await cli_ok(config, "agents", "pause", "alice", env={"USER": "mallory", "LOGNAME": "mallory"})
    await cli_ok(config, "agents", "resume", "alice", env={"SUDO_USER": "ops-carol"})

    rows = [r for r in await audit_rows(config) if r.operator is not None]
    assert [(r.tool, r.operator) for r in rows] == [
        ("agents.pause", OPERATOR),
        ("agents.resume", f"{OPERATOR} (sudo from ops-carol)"),
    ]


# -- policy reloads ------------------------------------------------------------------------------


async def test_each_policy_reload_in_a_serving_process_is_audited_with_both_files_sha256(
    config: Config, alice_key: str
) -> None:
    server = start_http_server(config)
    overrides = config.policy_path.with_name("policy.overrides.toml")

    async def reloads() -> list[AuditRecord]:
        return [r for r in await audit_rows(config) if r.tool == "policy.reload"]

    try:
        edited = TEST_POLICY.replace("[defaults]\n", "[defaults]\nmax_shots = 5000\n")
        config.policy_path.write_text(edited, encoding="utf-8")
        await eventually(lambda: _count(reloads, 1), within_s=20)
        await cli_ok(config, "quota", "set", "--defaults", "agent_quota.queued_jobs", "7")
        await eventually(lambda: _count(reloads, 2), within_s=20)
        config.policy_path.write_text(edited.replace("max_shots = 5000", "max_depth = 'deep'"), encoding="utf-8")
        await eventually(lambda: _count(reloads, 3), within_s=20)
        async with http_client(server.url, alice_key) as alice:
            in_force = await alice.read_resource("qpu://policy")
    finally:
        server.stop()

    applied, with_overrides, refused = await reloads()
    edited_sha = hashlib.sha256(edited.encode()).hexdigest()
    assert (applied.decision, applied.operator, applied.error_code) == ("ok", OPERATOR, None)
    assert f"policy {config.policy_path} sha256 {edited_sha}" in (applied.detail or "")
    assert f"overrides {overrides.name} beside it sha256 (no file)" in (applied.detail or "")
    overrides_sha = hashlib.sha256(overrides.read_bytes()).hexdigest()
    assert with_overrides.decision == "ok" and f"sha256 {overrides_sha}" in (with_overrides.detail or "")
    bad_sha = hashlib.sha256(config.policy_path.read_bytes()).hexdigest()
    assert (refused.decision, refused.error_code, refused.operator) == ("refused", "invalid_policy", OPERATOR)
    assert f"sha256 {bad_sha}" in (refused.detail or "") and "max_depth" in (refused.detail or "")
    assert json.loads(in_force.contents[0].text)["max_shots"] == 5000  # the last good policy stayed
    assert "intact" in await cli_ok(config, "audit", "verify")


async def _count(read: Any, n: int) -> bool:
    return len(await read()) >= n
