"""Planted secrets found nowhere, and one agent fenced off from another's jobs.

Real server processes (stdio and HTTP) run with fake provider credentials in their environment.
A session over each transport triggers results, refusals and errors; the operator runs the CLI.
Every byte the run produced (tool results, progress notifications, the servers' stderr logs, a
dump of the whole database, CLI output) is searched for the planted values and the gateway keys.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, ERAS, body, free_port, gateway_cmd, in_memory, stdio_params

pytestmark = pytest.mark.anyio

PLANTED = {
    "QISKIT_IBM_TOKEN": "planted-ibm-token-7f3a9c1e5b2d4f6a8c0e",
    "IBM_QUANTUM_TOKEN": "planted-ibm-quantum-token-2b4d6f8a0c1e",
    "AWS_ACCESS_KEY_ID": "AKIAPLANTED0FAKE0001",
    "AWS_SECRET_ACCESS_KEY": "planted/AWS+secret/key0123456789abcdefXYZ",
    "AWS_SESSION_TOKEN": "planted-aws-session-token-9e8d7c6b5a",
    "AZURE_CLIENT_SECRET": "planted~azure~client~secret~0123456789",
    "AZURE_QUANTUM_CONNECTION_STRING": (
        "SubscriptionId=00000000-0000-0000-0000-000000000000;ResourceGroupName=rg;WorkspaceName=ws;"
        "ApiKey=plantedAzureApiKey0123456789abcdefGHIJ;QuantumEndpoint=https://127.0.0.1:9/"
    ),
}
# Not secrets, but they keep the SDKs local and quick to fail: nothing here may reach a real cloud.
QUIET = {
    "AZURE_CLIENT_ID": "00000000-0000-0000-0000-000000000001",
    "AZURE_TENANT_ID": "00000000-0000-0000-0000-000000000002",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "*",
}
NEEDLES = (*PLANTED.values(), "plantedAzureApiKey0123456789abcdefGHIJ", "AKIAPLANTED0FAKE0001")
CLOUD_BACKENDS = ("ibm/ibm_brisbane", "braket/sv1", "azure/ionq.simulator", "braket/*", "azure/*")


def server_env(config: Config) -> dict[str, str]:
    return {**os.environ, **PLANTED, **QUIET, "QPU_GATEWAY_LEASE_S": str(config.lease_s)}


def secret_parts(key: str) -> list[str]:
    """A gateway key, and its secret half on its own (the id half is public)."""
    # qpg_<id>_<secret>; the secret itself may contain "_", so split at the second one only.
    secret = key.split("_", 2)[2]
    assert len(secret) >= 40
    return [key, secret]


class Recorder:
    """Everything a run hands to a client, plus a note of where each piece came from."""

    def __init__(self) -> None:
        self.pieces: list[tuple[str, str]] = []

    def add(self, where: str, value: Any) -> None:
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        self.pieces.append((where, value if isinstance(value, str) else json.dumps(value, default=str)))

    async def progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.add("progress", {"progress": progress, "total": total, "message": message})

    def find(self, needles: list[str]) -> list[tuple[str, str]]:
        return [(where, needle[:12]) for where, text in self.pieces for needle in needles if needle in text]


async def drive(client: Client, record: Recorder, where: str) -> str | None:
    """Results, refusals and errors: a job run to the end, bad input, unknown and cloud backends."""
    ok = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 20, "name": "secrets"})
    record.add(f"{where}:submit", ok)
    job_id = (ok.structured_content or {}).get("job_id")
    if job_id:
        done = await client.call_tool("wait_for_job", {"job_id": job_id}, progress_callback=record.progress)
        record.add(f"{where}:wait", done)
        try:
            record.add(f"{where}:resource", await client.read_resource(f"qpu://jobs/{job_id}"))
        except MCPError as exc:
            record.add(f"{where}:resource-error", exc.error)
    calls: list[tuple[str, dict[str, Any]]] = [
        ("list_backends", {}),
        ("estimate_job", {"circuit": "OPENQASM 2.0;\nfoo q;"}),
        ("submit_job", {"circuit": BELL2, "backend": "nowhere/else"}),
        ("submit_job", {"circuit": BELL2, "shots": "many"}),
        ("get_job", {"job_id": "job_" + "0" * 20}),
        ("cancel_job", {"job_id": job_id or "x"}),
        ("list_jobs", {"cursor": "bogus"}),
        ("get_usage", {}),
        ("no_such_tool", {}),
    ]
    for backend in CLOUD_BACKENDS:
        calls += [
            ("estimate_job", {"circuit": BELL2, "backend": backend}),
            ("submit_job", {"circuit": BELL2, "backend": backend}),
        ]
    for name, args in calls:
        record.add(f"{where}:{name}", await client.call_tool(name, args, progress_callback=record.progress))
    for uri in ("qpu://policy", "qpu://usage", "qpu://backends", "qpu://jobs/job_nope"):
        try:
            record.add(f"{where}:{uri}", await client.read_resource(uri))
        except MCPError as exc:
            record.add(f"{where}:{uri}-error", exc.error)
    return job_id


async def refused_session(client: Client, record: Recorder, where: str) -> None:
    for name, args in (("get_usage", {}), ("submit_job", {"circuit": BELL2}), ("list_backends", {})):
        record.add(f"{where}:{name}", await client.call_tool(name, args))


def start_logged_http_server(config: Config, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = ["serve", "--transport", "http", "--port", str(port), "--db", str(config.db_path)]
    process = subprocess.Popen(
        gateway_cmd(*args, "--policy", str(config.policy_path), "--log-level", "debug"),
        env=server_env(config),
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")
        try:
            httpx2.get(f"http://127.0.0.1:{port}/mcp", timeout=0.5)
            break
        except httpx2.HTTPError:
            time.sleep(0.1)
    return process, f"http://127.0.0.1:{port}/mcp"


def http_session(url: str, key: str, mode: str = "auto") -> Any:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30, read=120))
    return http, Client(streamable_http_client(url, http_client=http), mode=mode)  # type: ignore[arg-type]


def run_gateway(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    """`qpu-gateway ARGS` with the planted secrets in its environment."""
    return subprocess.run(
        gateway_cmd(*args), env=server_env(config), capture_output=True, text=True, timeout=120, check=False
    )


def cli(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    return run_gateway(config, *args, "--db", str(config.db_path), "--policy", str(config.policy_path))


def dump_database(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return "\n".join(conn.iterdump())


@pytest.mark.slow
async def test_planted_secrets_and_gateway_keys_appear_in_no_byte_a_run_produces(
    config: Config, alice_key: str, bob_key: str, tmp_path: Path
) -> None:
    record = Recorder()
    stdio_log, http_log = tmp_path / "stdio.stderr", tmp_path / "http.stderr"
    params = stdio_params(config, alice_key, **PLANTED, **QUIET)
    params.args[params.args.index("warning")] = "debug"  # the most a server ever logs
    with stdio_log.open("w") as errlog:
        for mode in ERAS:
            async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:  # type: ignore[arg-type]
                await drive(client, record, f"stdio-{mode}")
        bad = stdio_params(config, "qpg_000000000000_" + "z" * 43, **PLANTED, **QUIET)
        async with Client(stdio_client(bad, errlog=errlog)) as client:  # type: ignore[arg-type]
            await refused_session(client, record, "stdio-badkey")

    process, url = start_logged_http_server(config, http_log)
    try:
        for mode in ERAS:
            http, client = http_session(url, bob_key, mode)
            async with http, client:
                await drive(client, record, f"http-{mode}")
        async with httpx2.AsyncClient() as raw:
            request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
            headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
            for where, auth in (("none", {}), ("wrong", {"Authorization": "Bearer qpg_000000000000_" + "w" * 43})):
                response = await raw.post(url, json=request, headers={**headers, **auth})
                record.add(f"http-401-{where}", f"{response.status_code} {response.headers} {response.text}")
    finally:
        process.terminate()
        process.wait(timeout=20)

    cli_runs = [
        ("keys", "list"),
        ("jobs", "list"),
        ("audit", "tail"),
        ("usage",),
        ("policy", "show", "--agent", "alice"),
        ("approvals", "list"),
    ]
    first_job = sqlite3.connect(config.db_path).execute("SELECT id FROM jobs ORDER BY seq LIMIT 1").fetchone()
    if first_job:
        cli_runs.append(("jobs", "show", first_job[0]))
    for args in cli_runs:
        out = cli(config, *args)
        assert out.returncode == 0, (args, out.stderr)
        record.add(f"cli {' '.join(args)} stdout", out.stdout)
        record.add(f"cli {' '.join(args)} stderr", out.stderr)
    record.add("stdio stderr", stdio_log.read_text(errors="replace"))
    record.add("http stderr", http_log.read_text(errors="replace"))
    record.add("database", dump_database(config.db_path))

    # The run did what it should: jobs ran on both transports, cloud refusals were given.
    assert sum(1 for where, _ in record.pieces if where.endswith(":wait")) == 4
    assert all("unauthorized" in text for where, text in record.pieces if where.startswith("stdio-badkey"))
    assert [text[:3] for where, text in record.pieces if where.startswith("http-401")] == ["401", "401"]
    if os.environ.get("QPU_SECRETS_DEBUG"):
        print("\n".join(f"{where}: {text[:300]}" for where, text in record.pieces))
    leaks = record.find([*NEEDLES, *secret_parts(alice_key), *secret_parts(bob_key)])
    assert leaks == [], leaks


async def test_only_key_creation_and_init_print_a_key(config: Config, tmp_path: Path) -> None:
    created = cli(config, "keys", "create", "--agent", "carol")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("qpg_")
    outputs = [created.stderr]
    for args in (("keys", "list"), ("audit", "tail"), ("usage",), ("policy", "show", "--agent", "carol")):
        out = cli(config, *args)
        outputs += [out.stdout, out.stderr]
    init = run_gateway(config, "init", "--db", str(tmp_path / "init.db"))
    local = init.stdout.strip().splitlines()[-1]
    assert init.returncode == 0 and local.startswith("qpg_"), init.stderr
    assert not [part for part in secret_parts(local) if part in init.stderr]
    assert not [part for part in secret_parts(key) for text in outputs if part in text]
    assert not [needle for needle in NEEDLES for text in [*outputs, created.stdout] if needle in text]


# -- isolation ----------------------------------------------------------------------------------


def guesses(job_id: str) -> list[str]:
    """Ids near a real one: each hex digit changed, case and padding games, prefixes and patterns."""
    hexpart = job_id.removeprefix("job_")
    near = [f"job_{hexpart[:i]}{'0' if c != '0' else '1'}{hexpart[i + 1 :]}" for i, c in enumerate(hexpart)]
    tricks = [
        job_id.upper(),
        f" {job_id}",
        f"{job_id} ",
        f"{job_id}\x00",
        job_id[:-1],
        f"{job_id}0",
        hexpart,
        "job_%",
        "job_*",
        f"{job_id[:8]}%",
        "' OR '1'='1",
        f"{job_id}' OR agent='alice",
        f"../jobs/{job_id}",
        f"qpu://jobs/{job_id}",
    ]
    return [job_id, *near, *tricks]


@pytest.mark.parametrize("mode", ERAS)
async def test_an_agent_cannot_read_wait_on_subscribe_to_list_or_cancel_anothers_job(
    config: Config, gateway: Gateway, alice_key: str, bob_key: str, mode: str
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as alice:
        queued = (await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10})).structured_content
        done = (await alice.call_tool("wait_for_job", {"job_id": queued["job_id"]})).structured_content
        running = (
            await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10, "name": "live"})
        ).structured_content
    targets = [done["job_id"], running["job_id"]]
    async with in_memory(gateway, bob_key, mode=mode) as bob:
        tools = {t.name for t in (await bob.list_tools()).tools}
        assert not [t for t in tools if "approv" in t or "deny" in t]  # approval is operator-only
        listed = (await bob.call_tool("list_jobs", {"limit": 100})).structured_content
        answers = []
        for guess in itertools.chain.from_iterable(guesses(t) for t in targets):
            for name, args in (
                ("get_job", {"job_id": guess}),
                ("wait_for_job", {"job_id": guess, "timeout_s": 0}),
                ("cancel_job", {"job_id": guess}),
            ):
                result = await bob.call_tool(name, args)
                answers.append((name, guess, result.is_error, body(result).get("code")))
            for attempt in ("read", "subscribe"):
                with pytest.raises(MCPError) as refused:
                    if attempt == "read":
                        await bob.read_resource(f"qpu://jobs/{guess}")
                    elif mode == "legacy":
                        await bob.subscribe_resource(f"qpu://jobs/{guess}")
                    else:
                        async with bob.listen(resource_subscriptions=[f"qpu://jobs/{guess}"]):
                            pass
                assert alice_key not in str(refused.value.error)
        usage = (await bob.call_tool("get_usage", {})).structured_content
    assert listed["jobs"] == []
    assert [a for a in answers if not a[2] or a[3] not in ("not_found", "invalid_arguments")] == []
    assert json.dumps(usage).count("secrets") == 0 and "alice" not in json.dumps(usage)
    for job_id in targets:
        job = await gateway.store.get_job(job_id)
        assert job is not None and job.agent == "alice" and job.state.value != "cancelled"
    rows = await gateway.store.audit_tail(limit=10_000)
    assert not [r for r in rows if r.agent == "bob" and r.decision == "ok" and r.job_id in targets]


async def test_a_job_held_for_an_operator_is_approved_only_by_the_operator(
    config: Config, alice_key: str, bob_key: str
) -> None:
    config.policy_path.write_text(
        '[defaults]\nallowed_backends = ["aer/*", "faulty/*"]\noperator_above_usd = "0.00"\n'
        '[prices."aer/*"]\nmodel = "per_task_shot"\nper_task_usd = "0.01"\nper_shot_usd = "0.00"\n',
        encoding="utf-8",
    )
    held_gateway = Gateway(config)
    async with held_gateway.running(), in_memory(held_gateway, alice_key) as alice:
        held = await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10})
        async with in_memory(held_gateway, bob_key) as bob:
            names = {t.name for t in (await bob.list_tools()).tools}
            attempts = [
                await bob.call_tool(n, {"job_id": body(held).get("job_id", "")}) for n in ("approve_job", "approve")
            ]
        job = await held_gateway.store.get_job(body(held)["job_id"])
    assert held.is_error and body(held)["code"] == "approval_required", held.content
    assert not [n for n in names if "approv" in n]
    assert all(a.is_error and body(a)["code"] == "not_found" for a in attempts)
    assert job is not None and job.state.value == "pending_approval"
