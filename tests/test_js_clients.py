"""Clients nobody here wrote, over real transports: the TypeScript SDK v1 client and the MCP Inspector
CLI (2.12 on Node 22, 0.15 on the system's Node 20) drive a gateway subprocess over stdio and a real
`qpu-gateway serve --transport http` on loopback, through a success and every error class a tool
call can end in. Each result must be accepted by the client (no schema complaint) and carry the
coded body an agent reads."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.store import open_store

from .js_clients import INSPECTOR, INSPECTOR_015, TS_SDK_SESSION, json_lines, node22, package_version, system_node
from .support import BELL2, HttpServer, body, in_memory, new_key, start_http_server

pytestmark = pytest.mark.anyio

# Prices and limits that make each error class reachable in a few calls: a $6.00 job on the test
# backend `faulty/qpu` needs an operator ($5.00 threshold) and is held with its cost reserved, so a
# second one passes the $10.00 daily budget; get_usage may be called once an hour.
POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }
operator_above_usd = "5.00"
agent_quota = { cost_usd = { day = "10.00" } }
rate_limits = [{ limit = "1/hour", per = "agent", tools = ["get_usage"] }]

[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "6.00"
per_shot_usd = "0.00"
"""
NO_MEASUREMENT = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1];\nh q[0];\n'
PRICED = {"circuit": BELL2, "backend": "faulty/qpu"}


@dataclass(frozen=True)
class Case:
    id: str
    tool: str
    arguments: dict[str, Any]
    code: str | None  # None: a success


def cases(succeeded_job: str) -> list[list[Case]]:
    """A success and each error class, in groups: a group's calls depend on their order (the second
    get_usage is over the rate limit; the second priced job is over the budget the first reserved)."""
    return [
        [Case("estimate", "estimate_job", {"circuit": BELL2, "shots": 100}, None)],
        [Case("job_with_counts", "get_job", {"job_id": succeeded_job}, None)],
        [Case("bad_limit", "list_jobs", {"limit": 1000}, "invalid_arguments")],
        [Case("bad_type", "submit_job", {"circuit": BELL2, "shots": "many"}, "invalid_arguments")],
        [Case("no_measurement", "estimate_job", {"circuit": NO_MEASUREMENT}, "invalid_circuit")],
        [Case("unknown_job", "get_job", {"job_id": "job_00000000000000000000"}, "not_found")],
        [Case("unknown_tool", "run_everything", {}, "not_found")],
        [Case("unknown_backend", "estimate_job", {"circuit": BELL2, "backend": "nowhere/qpu"}, "unsupported_backend")],
        [Case("too_many_shots", "estimate_job", {"circuit": BELL2, "shots": 10_000_000}, "limit_exceeded")],
        [Case("conflict", "cancel_job", {"job_id": succeeded_job}, "conflict")],
        [
            Case("usage", "get_usage", {}, None),
            Case("usage_again", "get_usage", {}, "rate_limited"),
        ],
        [
            Case("priced_job", "submit_job", {**PRICED, "shots": 10}, "approval_required"),
            Case("over_budget", "submit_job", {**PRICED, "shots": 20}, "quota_exhausted"),
        ],
    ]


FORBIDDEN = Case("read_only_submits", "submit_job", {"circuit": BELL2, "shots": 10}, "forbidden")
UNAUTHORIZED = Case("revoked_key", "list_jobs", {}, "unauthorized")


@dataclass
class Site:
    """One gateway's files and keys: an agent with every scope, one with `read` only, a revoked one."""

    config: Config
    home: Path
    key: str
    read_only_key: str
    revoked_key: str
    succeeded_job: str
    http: HttpServer | None = None
    env: dict[str, str] = field(default_factory=dict)

    def gateway_args(self) -> list[str]:
        return [
            "-m",
            "qpu_gateway",
            "serve",
            "--transport",
            "stdio",
            "--db",
            str(self.config.db_path),
            "--policy",
            str(self.config.policy_path),
            "--log-level",
            "warning",
        ]

    def gateway_env(self, key: str | None) -> dict[str, str]:
        """What the stdio server needs in its environment: the key and the test backend, nothing else."""
        env = {"QPU_GATEWAY_FAULTS": "ok", "QPU_GATEWAY_LEASE_S": "3"}
        return {**env, "QPU_GATEWAY_KEY": key} if key else env


@pytest.fixture
async def site(config: Config, tmp_path: Path) -> Site:
    config.policy_path.write_text(POLICY, encoding="utf-8")
    key = await new_key(config.database, "alice")
    read_only = await new_key(config.database, "reader", scopes="read")
    revoked = await new_key(config.database, "gone")
    store = await open_store(config.database)
    try:
        assert await store.revoke_key(revoked.split("_")[1], time.time())
    finally:
        await store.close()
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100}))
        done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
    assert done["state"] == "succeeded"
    home = tmp_path / "home"  # the Inspector keeps a catalog under ~/.mcp-inspector
    home.mkdir()
    return Site(config, home, key, read_only, revoked, submitted["job_id"])


@pytest.fixture(params=["stdio", "http"])
def transport_site(request: pytest.FixtureRequest, site: Site) -> Iterator[Site]:
    if request.param == "http":
        site.http = start_http_server(site.config, QPU_GATEWAY_FAULTS="ok")
    try:
        yield site
    finally:
        if site.http is not None:
            site.http.stop()


def node_env(site: Site, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(site.home), **extra}


def assert_accepted(case: Case, result: dict[str, Any]) -> None:
    """The client took the result as a valid tool result, and the body is the one an agent reads."""
    if case.code is None:
        assert not result.get("isError"), (case, result)
        assert isinstance(result.get("structuredContent"), dict), (case, result)
        assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    else:
        assert result.get("isError") is True, (case, result)
        assert "structuredContent" not in result, (case, result)
        coded = json.loads(result["content"][0]["text"])
        assert coded["code"] == case.code, (case, coded)
        assert coded["message"], (case, coded)
        if case.code in ("approval_required", "conflict"):
            assert coded["job_id"].startswith("job_"), coded
        if case.code == "rate_limited":
            assert coded["retry_after_s"] > 0, coded


# -- the TypeScript SDK v1 client -----------------------------------------------------------------


def ts_session(site: Site, name: str, key: str | None, steps: list[dict[str, Any]]) -> dict[str, Any]:
    if site.http is not None:
        return {
            "name": name,
            "transport": "http",
            "url": site.http.url,
            "headers": {"Authorization": f"Bearer {key}"} if key else {},
            "steps": steps,
        }
    return {
        "name": name,
        "transport": "stdio",
        "command": sys.executable,
        "args": site.gateway_args(),
        "env": site.gateway_env(key),
        "steps": steps,
    }


def call_step(case: Case) -> dict[str, Any]:
    return {"id": case.id, "method": "tools/call", "name": case.tool, "arguments": case.arguments}


async def run_ts_sdk(site: Site, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    done = await anyio.run_process(
        [node22(), str(TS_SDK_SESSION), json.dumps({"sessions": sessions})], env=node_env(site), check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return json_lines(done.stdout.decode())


async def test_the_typescript_sdk_client_accepts_every_result_and_reads_each_coded_error(
    transport_site: Site,
) -> None:
    site = transport_site
    listed: list[dict[str, Any]] = [{"id": "tools", "method": "tools/list"}]  # arms the output-schema checks
    main = [case for group in cases(site.succeeded_job) for case in group]
    events = await run_ts_sdk(
        site,
        [
            ts_session(site, "alice", site.key, listed + [call_step(c) for c in main]),
            ts_session(site, "reader", site.read_only_key, [*listed, call_step(FORBIDDEN)]),
            ts_session(site, "gone", site.revoked_key, [*listed, call_step(UNAUTHORIZED)]),
            ts_session(site, "nokey", None, [*listed, call_step(UNAUTHORIZED)]),
        ],
    )
    by_step = {(e["session"], e["step"]): e for e in events if "step" in e}
    connected = {e["session"]: e for e in events if e.get("event") == "connected"}

    assert connected["alice"]["protocolVersion"] == "2025-11-25"
    assert connected["alice"]["server"]["name"] == "qpu-gateway"
    assert package_version("@modelcontextprotocol/sdk").startswith("1.")
    for session, case in [*[("alice", c) for c in main], ("reader", FORBIDDEN)]:
        answer = by_step[(session, case.id)]
        assert answer["ok"], (case, answer)  # the client threw nothing: no -32602 schema rejection
        assert_accepted(case, answer["result"])
    for session in ("gone", "nokey"):
        if site.http is None:
            assert_accepted(UNAUTHORIZED, by_step[(session, UNAUTHORIZED.id)]["result"])
            continue
        # Over HTTP a missing or revoked key never opens a session; the client reports the 401's
        # body, which says how to get and send a key (no OAuth discovery: no auth provider is set,
        # as for any client given a key in a header).
        failed = next(e for e in events if e.get("event") == "connect_failed" and e["session"] == session)
        assert failed["error"]["code"] == 401, failed
        assert "qpu-gateway keys create --agent NAME" in failed["error"]["message"], failed
        assert "Authorization: Bearer <key>" in failed["error"]["message"], failed


# -- the MCP Inspector CLI ------------------------------------------------------------------------


@dataclass(frozen=True)
class Inspector:
    """One Inspector CLI release and the Node it runs on."""

    name: str
    node: str
    script: Path


def inspector_2() -> Inspector:
    return Inspector(f"inspector {package_version('@modelcontextprotocol/inspector')}", node22(), INSPECTOR)


def inspector_015() -> Inspector:
    return Inspector(
        f"inspector-cli {package_version('@modelcontextprotocol/inspector-cli')}", system_node(), INSPECTOR_015
    )


async def inspect(site: Site, key: str, case: Case, *, era: str | None = None) -> dict[str, Any]:
    """One Inspector 2.12 CLI call (`--cli --format json`); returns what it printed on stdout."""
    command = [node22(), str(INSPECTOR), "--cli", "--format", "json", "-q"]
    command += ["--protocol-era", era] if era else []
    command += ["--method", "tools/call", "--tool-name", case.tool, "--tool-args-json", json.dumps(case.arguments)]
    if site.http is not None:
        command += ["--transport", "http", "--server-url", site.http.url, "--header", f"Authorization: Bearer {key}"]
    else:
        for name, value in site.gateway_env(key).items():
            command += ["-e", f"{name}={value}"]
        command += [sys.executable, *site.gateway_args()]
    done = await anyio.run_process(command, env=node_env(site), check=False)
    # Exit 5 is the CLI's "the tool answered isError"; anything else but 0 is a failure.
    printed = json_lines(done.stdout.decode())
    assert done.returncode in (0, 5) and printed, (case, done.returncode, done.stdout, done.stderr[-2000:])
    assert (done.returncode == 5) == (case.code is not None), (case, done.returncode)
    return printed[-1]


async def inspect_015(site: Site, key: str, case: Case) -> dict[str, Any]:
    """One Inspector 0.15 CLI call over stdio (it cannot send HTTP headers); it prints the result."""
    args = [f"{name}={value}" for name, value in case.arguments.items()]
    command = [system_node(), str(INSPECTOR_015), sys.executable, "--method", "tools/call", "--tool-name", case.tool]
    command += ["--tool-arg", *args] if args else []
    command += ["--", *site.gateway_args()]  # after `--`, so the CLI does not read the server's options
    # 0.15 hands the stdio server its own environment, so the key goes there.
    done = await anyio.run_process(command, env=node_env(site, **site.gateway_env(key)), check=False)
    assert done.returncode == 0, (case, done.stdout, done.stderr[-2000:])
    return dict(json.loads(done.stdout.decode()))


async def run_groups(calls: list[list[Any]], run: Any) -> dict[str, Any]:
    """Each group's calls in order, groups side by side (at most three processes at once)."""
    answers: dict[str, Any] = {}
    limit = anyio.CapacityLimiter(3)

    async def group(items: list[Any]) -> None:
        for item in items:
            async with limit:
                answers[item.id] = await run(item)

    async with anyio.create_task_group() as tg:
        for items in calls:
            tg.start_soon(group, items)
    return answers


async def test_the_inspector_cli_shows_every_result_and_each_coded_error(transport_site: Site) -> None:
    site = transport_site
    # Inspector 2.12 checks a tool name against tools/list itself and never sends an unknown one.
    groups = [[c for c in group if c.id != "unknown_tool"] for group in cases(site.succeeded_job)]
    groups = [*(group for group in groups if group), [FORBIDDEN]]
    if site.http is None:
        groups.append([UNAUTHORIZED])
    keys = {FORBIDDEN.id: site.read_only_key, UNAUTHORIZED.id: site.revoked_key}

    answers = await run_groups(groups, lambda case: inspect(site, keys.get(case.id, site.key), case))

    assert inspector_2().name == "inspector 2.12.0"
    for case in (case for group in groups for case in group):
        assert "error" not in answers[case.id], (case, answers[case.id])  # no schema complaint
        assert_accepted(case, answers[case.id]["result"])


async def test_the_inspector_cli_in_the_2026_era_reads_results_and_coded_errors(transport_site: Site) -> None:
    site = transport_site
    picked = [
        Case("estimate", "estimate_job", {"circuit": BELL2, "shots": 100}, None),
        Case("unknown_job", "get_job", {"job_id": "job_00000000000000000000"}, "not_found"),
        Case("bad_type", "submit_job", {"circuit": BELL2, "shots": "many"}, "invalid_arguments"),
    ]

    answers = await run_groups([[case] for case in picked], lambda case: inspect(site, site.key, case, era="modern"))

    for case in picked:
        result = answers[case.id]["result"]
        # A 2026-07-28 result names the server in its _meta; a 2025-11-25 one has no such key.
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "qpu-gateway", result
        assert_accepted(case, result)


async def test_the_inspector_015_cli_on_node_20_reads_every_result_over_stdio(site: Site) -> None:
    assert package_version("@modelcontextprotocol/inspector-cli") == "0.15.0"
    groups = [
        [Case("job_with_counts", "get_job", {"job_id": site.succeeded_job}, None)],
        [Case("bad_limit", "list_jobs", {"limit": "1000"}, "invalid_arguments")],
        [Case("no_measurement", "estimate_job", {"circuit": NO_MEASUREMENT}, "invalid_circuit")],
        [Case("unknown_job", "get_job", {"job_id": "job_00000000000000000000"}, "not_found")],
        [Case("unknown_tool", "run_everything", {}, "not_found")],
        [Case("unknown_backend", "estimate_job", {"circuit": BELL2, "backend": "nowhere/qpu"}, "unsupported_backend")],
        [Case("too_many_shots", "estimate_job", {"circuit": BELL2, "shots": "10000000"}, "limit_exceeded")],
        [Case("conflict", "cancel_job", {"job_id": site.succeeded_job}, "conflict")],
        [Case("usage", "get_usage", {}, None), Case("usage_again", "get_usage", {}, "rate_limited")],
        [
            Case("priced_job", "submit_job", {**PRICED, "shots": "10"}, "approval_required"),
            Case("over_budget", "submit_job", {**PRICED, "shots": "20"}, "quota_exhausted"),
        ],
        [FORBIDDEN],
        [UNAUTHORIZED],
    ]
    keys = {FORBIDDEN.id: site.read_only_key, UNAUTHORIZED.id: site.revoked_key}

    answers = await run_groups(groups, lambda case: inspect_015(site, keys.get(case.id, site.key), case))

    for case in (case for group in groups for case in group):
        assert_accepted(case, answers[case.id])


async def test_both_inspector_clis_without_a_key_over_http_show_how_to_get_one(site: Site) -> None:
    site.http = start_http_server(site.config)
    try:
        # --stored-auth-only: what the 2.x CLI is told in CI, instead of starting an interactive OAuth login.
        listing = ["--method", "tools/list", "--transport", "http", "--server-url", site.http.url]
        modern = await anyio.run_process(
            [node22(), str(INSPECTOR), "--cli", "--format", "json", "--stored-auth-only", *listing],
            env=node_env(site),
            check=False,
        )
        old = await anyio.run_process(
            [system_node(), str(INSPECTOR_015), site.http.url, "--method", "tools/list"],
            env=node_env(site),
            check=False,
        )
    finally:
        site.http.stop()
    for done in (modern, old):
        assert done.returncode != 0
        said = done.stdout.decode() + done.stderr.decode()
        assert "qpu-gateway keys create --agent NAME" in said, said
        assert "Authorization: Bearer <key>" in said, said


async def test_the_typescript_sdk_client_completes_reads_prompts_and_hears_its_jobs(transport_site: Site) -> None:
    site = transport_site
    jobs = {"type": "ref/resource", "uri": "qpu://jobs/{job_id}"}
    steps: list[dict[str, Any]] = [
        {"id": "tools", "method": "tools/list"},
        {"id": "level", "method": "logging/setLevel", "level": "info"},
        {"id": "job_ids", "method": "completion/complete", "ref": jobs, "argument": {"name": "job_id", "value": ""}},
        {
            "id": "backends",
            "method": "completion/complete",
            "ref": {"type": "ref/prompt", "name": "run_circuit"},
            "argument": {"name": "backend", "value": "aer"},
        },
        {"id": "unknown_prompt", "method": "prompts/get", "name": "run_everything"},
        {"id": "prompt", "method": "prompts/get", "name": "run_circuit", "arguments": {"backend": "aer/simulator"}},
        {"id": "submit", **call_step(Case("submit", "submit_job", {"circuit": BELL2, "shots": 10}, None))},
        {"id": "pause", "method": "sleep", "ms": 4000},  # no call in flight: the job's news comes on its own
    ]

    events = await run_ts_sdk(site, [ts_session(site, "alice", site.key, steps)])

    by_step = {e["step"]: e for e in events if "step" in e}
    assert by_step["job_ids"]["result"]["completion"]["values"] == [site.succeeded_job]
    assert by_step["backends"]["result"]["completion"]["values"] == ["aer/simulator"]
    assert by_step["unknown_prompt"]["ok"] is False and by_step["unknown_prompt"]["error"]["code"] == -32602
    assert "estimate_job" in by_step["prompt"]["result"]["messages"][0]["content"]["text"]
    submitted = by_step["submit"]["result"]["structuredContent"]["job_id"]
    heard = [e["params"] for e in events if e.get("event") == "log"]
    states = [p["data"]["state"] for p in heard if p["data"].get("job_id") == submitted]
    assert states and states[-1] == "succeeded", heard
    assert all(p["logger"] == "qpu-gateway" and p["level"] in ("info", "warning", "error") for p in heard)
