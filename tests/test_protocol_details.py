"""Protocol details a real client meets: an unknown prompt, completion of job ids and backends, and log
messages a session asked for (logging/setLevel in 2025-11-25, the request's _meta in 2026-07-28)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, LoggingMessageNotificationParams, PromptReference, ResourceTemplateReference

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.mcp.app import build_server

from .support import BELL2, ERAS, body, eventually, in_memory, new_key, stdio_params

pytestmark = pytest.mark.anyio

JOBS = ResourceTemplateReference(type="ref/resource", uri="qpu://jobs/{job_id}")
RUN_CIRCUIT = PromptReference(type="ref/prompt", name="run_circuit")


async def audit_rows(gateway: Gateway, tool: str) -> list[Any]:
    return [row for row in await gateway.store.audit_tail(limit=10_000) if row.tool == tool]


# -- an unknown prompt ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_an_unknown_prompt_is_an_invalid_params_error_with_one_audit_row(
    gateway: Gateway, alice_key: str, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as client:
        with pytest.raises(MCPError) as refused:
            await client.get_prompt("run_everything", {})
        with pytest.raises(MCPError) as bad_argument:
            await client.get_prompt("run_circuit", {"colour": "blue"})

    assert refused.value.error.code == INVALID_PARAMS
    assert refused.value.error.data["code"] == "not_found"
    assert "prompts/list" in refused.value.error.message
    assert bad_argument.value.error.code == INVALID_PARAMS
    assert bad_argument.value.error.data["code"] == "invalid_arguments"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    (row,) = await audit_rows(gateway, "run_everything")
    assert (row.agent, row.decision, row.error_code) == ("alice", "refused", "not_found")


async def test_an_unknown_prompt_over_stdio_leaves_no_traceback_in_the_servers_log(
    config: Config, alice_key: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "stderr.log"
    with log_path.open("w") as errlog:
        async with Client(stdio_client(stdio_params(config, alice_key), errlog=errlog), mode="legacy") as client:  # type: ignore[arg-type]
            with pytest.raises(MCPError) as refused:
                await client.get_prompt("run_everything", {})
            prompt = await client.get_prompt("run_circuit", {"backend": "aer/simulator"})
    assert refused.value.error.code == INVALID_PARAMS
    assert "estimate_job" in prompt.messages[0].content.text  # type: ignore[union-attr]
    logged = log_path.read_text()
    assert "Traceback" not in logged and '"level": "error"' not in logged, logged


# -- completion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
async def test_job_ids_complete_to_the_callers_own_jobs_only(
    gateway: Gateway, alice_key: str, bob_key: str, mode: str
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as alice, in_memory(gateway, bob_key, mode=mode) as bob:
        mine = [body(await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))["job_id"] for _ in range(3)]
        theirs = body(await bob.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))["job_id"]
        everything = (await alice.complete(JOBS, {"name": "job_id", "value": ""})).completion
        narrowed = (await alice.complete(JOBS, {"name": "job_id", "value": mine[1][:12]})).completion
        guessed = (await alice.complete(JOBS, {"name": "job_id", "value": theirs[:12]})).completion
        for_bob = (await bob.complete(JOBS, {"name": "job_id", "value": "job_"})).completion

    assert everything.values == list(reversed(mine)) and everything.total == 3 and not everything.has_more
    assert mine[1] in narrowed.values and all(v.startswith(mine[1][:12]) for v in narrowed.values)
    assert theirs not in guessed.values
    assert for_bob.values == [theirs]
    rows = await audit_rows(gateway, "completion/complete:qpu://jobs/{job_id}")
    assert [(r.agent, r.decision) for r in rows] == [("alice", "ok")] * 3 + [("bob", "ok")]


async def test_the_prompts_backend_completes_to_backends_the_callers_policy_allows(
    config: Config, alice_key: str
) -> None:
    config.policy_path.write_text(
        '[defaults]\nallowed_backends = ["aer/*", "ibm/fake_l*"]\n[agents.alice]\nallowed_backends = ["aer/*"]\n',
        encoding="utf-8",
    )
    bob_key = await new_key(config.database, "bob")
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as alice, in_memory(gateway, bob_key) as bob:
        prompts = (await alice.list_prompts()).prompts
        for_alice = (await alice.complete(RUN_CIRCUIT, {"name": "backend", "value": ""})).completion
        for_bob = (await bob.complete(RUN_CIRCUIT, {"name": "backend", "value": "ibm/"})).completion
        other = (await bob.complete(RUN_CIRCUIT, {"name": "goal", "value": "b"})).completion

    (run_circuit,) = prompts
    assert [a.name for a in run_circuit.arguments or []] == ["goal", "backend"]
    assert for_alice.values == ["aer/simulator"]
    assert for_bob.values and all(v.startswith("ibm/fake_l") for v in for_bob.values)
    assert other.values == []


async def test_completion_needs_a_key_with_the_scope(config: Config, gateway: Gateway) -> None:
    estimator = await new_key(config.database, "eve", scopes="estimate")
    async with in_memory(gateway, None) as nobody, in_memory(gateway, estimator) as eve:
        with pytest.raises(MCPError) as unauthorized:
            await nobody.complete(JOBS, {"name": "job_id", "value": "job_"})
        with pytest.raises(MCPError) as forbidden:
            await eve.complete(JOBS, {"name": "job_id", "value": "job_"})
        backends = (await eve.complete(RUN_CIRCUIT, {"name": "backend", "value": "aer"})).completion
    assert unauthorized.value.error.data["code"] == "unauthorized"
    assert forbidden.value.error.data["code"] == "forbidden"
    assert backends.values == ["aer/simulator"]


# -- log messages -----------------------------------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.messages: list[LoggingMessageNotificationParams] = []

    async def __call__(self, params: LoggingMessageNotificationParams) -> None:
        self.messages.append(params)

    def data(self, **match: Any) -> list[dict[str, Any]]:
        found = [dict(m.data) for m in self.messages if isinstance(m.data, dict)]
        return [d for d in found if all(d.get(k) == v for k, v in match.items())]


RATE_POLICY = """
[defaults]
allowed_backends = ["aer/*"]
rate_limits = [{ limit = "1/second", per = "agent", tools = ["get_usage"], mode = "wait", max_wait_s = 5 }]
"""


async def test_after_set_level_a_2025_session_hears_of_its_own_refusals_jobs_and_waits_and_nothing_else(
    config: Config, alice_key: str, bob_key: str
) -> None:
    config.policy_path.write_text(RATE_POLICY, encoding="utf-8")
    gateway = Gateway(config)
    alice_inbox, bob_inbox = Inbox(), Inbox()
    async with (
        gateway.running(),
        Client(build_server(gateway, lambda: alice_key), mode="legacy", logging_callback=alice_inbox) as alice,  # type: ignore[arg-type]
        Client(build_server(gateway, lambda: bob_key), mode="legacy", logging_callback=bob_inbox) as bob,  # type: ignore[arg-type]
    ):
        before = body(await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))  # not asked yet
        await alice.set_logging_level("info")
        await bob.set_logging_level("debug")
        job = body(await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))
        await bob.call_tool("get_job", {"job_id": job["job_id"]})  # not bob's
        await alice.call_tool("get_usage", {})
        await alice.call_tool("get_usage", {})  # waits about a second for the rate limit

        async def settled() -> bool:
            return bool(alice_inbox.data(job_id=job["job_id"], state="succeeded"))

        await eventually(settled)

    states = [d["state"] for d in alice_inbox.data(event="job_state", job_id=job["job_id"])]
    assert states[-1] == "succeeded" and all(level == "info" for level in _levels(alice_inbox, "job_state"))
    assert alice_inbox.data(event="rate_limit_wait", call="get_usage")
    assert not alice_inbox.data(decision="ok")  # successes are debug, below the level alice set
    assert not alice_inbox.data(job_id=before["job_id"])  # submitted before alice asked
    (refusal,) = bob_inbox.data(decision="refused")
    assert refusal["code"] == "not_found" and refusal["call"] == "get_job"
    assert not bob_inbox.data(event="job_state")  # never another agent's job
    heard = json.dumps([m.model_dump(mode="json") for m in alice_inbox.messages + bob_inbox.messages])
    assert alice_key not in heard and bob_key not in heard and "alice" not in json.dumps(bob_inbox.data())


def _levels(inbox: Inbox, event: str) -> list[str]:
    return [m.level for m in inbox.messages if isinstance(m.data, dict) and m.data.get("event") == event]


async def test_a_2025_session_over_stdio_hears_of_its_job_between_calls(config: Config, alice_key: str) -> None:
    inbox = Inbox()
    async with Client(stdio_params(config, alice_key), mode="legacy", logging_callback=inbox) as client:  # type: ignore[arg-type]
        await client.set_logging_level("info")
        job = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))

        async def ended() -> bool:  # no call in flight: the message comes on the connection's stream
            return bool(inbox.data(job_id=job["job_id"], state="succeeded"))

        await eventually(ended)
    assert inbox.messages[-1].logger == "qpu-gateway"


async def test_a_2026_request_that_asks_in_its_meta_hears_of_itself_and_others_hear_nothing(
    config: Config, alice_key: str
) -> None:
    config.policy_path.write_text(RATE_POLICY, encoding="utf-8")
    gateway = Gateway(config)
    asked, silent = Inbox(), Inbox()
    server = build_server(gateway, lambda: alice_key)
    async with (
        gateway.running(),
        Client(server, mode="2026-07-28", log_level="info", logging_callback=asked) as client,  # type: ignore[arg-type]
        Client(server, mode="2026-07-28", logging_callback=silent) as other,  # type: ignore[arg-type]
    ):
        job = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))
        await client.call_tool("wait_for_job", {"job_id": job["job_id"]})
        await client.call_tool("get_job", {"job_id": "job_00000000000000000000"})
        await client.call_tool("get_usage", {})
        await client.call_tool("get_usage", {})
        await other.call_tool("get_job", {"job_id": "job_00000000000000000000"})
        await anyio.sleep(0.2)

    assert any("succeeded" in d["message"] for d in asked.data(event="job_state", job_id=job["job_id"]))
    assert asked.data(decision="refused", code="not_found")
    assert asked.data(event="rate_limit_wait")
    assert silent.messages == []  # it never asked
