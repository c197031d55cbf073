"""Every tool and resource through a real in-memory MCP client: results, coded refusals, audit rows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, BELL3, ERAS, body, in_memory, new_key

pytestmark = pytest.mark.anyio

GHZ3 = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[3];
creg c[3];
h q[0];
cx q[0], q[1];
cx q[1], q[2];
measure q -> c;
"""


async def audit_rows(gateway: Gateway) -> list[Any]:
    return await gateway.store.audit_tail(limit=10_000)


async def submit_and_wait(client: Any, **args: Any) -> dict[str, Any]:
    submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100, **args}))
    return body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"], "timeout_s": 60}))


@pytest.mark.parametrize("mode", ERAS)
async def test_tools_publish_descriptions_schemas_and_annotations(gateway: Gateway, alice_key: str, mode: str) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == {
        "list_backends",
        "estimate_job",
        "submit_job",
        "get_job",
        "wait_for_job",
        "cancel_job",
        "list_jobs",
        "get_usage",
    }
    for tool in tools.values():
        assert tool.description and len(tool.description) > 40
        assert tool.output_schema is not None and tool.output_schema["type"] == "object"
        assert tool.annotations is not None
    for name in ("list_backends", "estimate_job", "get_job", "wait_for_job", "list_jobs", "get_usage"):
        assert tools[name].annotations.read_only_hint is True
    assert tools["cancel_job"].annotations.destructive_hint is True
    assert "circuit" in tools["submit_job"].input_schema["properties"]
    assert "circuits" in tools["submit_job"].input_schema["properties"]


async def test_a_sweep_is_one_job_with_counts_per_circuit_in_order(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        estimate = body(await client.call_tool("estimate_job", {"circuits": [BELL2, GHZ3, BELL3], "shots": 64}))
        assert (estimate["circuits"], estimate["total_shots"], estimate["qubits"]) == (3, 192, 3)
        submitted = body(await client.call_tool("submit_job", {"circuits": [BELL2, GHZ3, BELL3], "shots": 64}))
        done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
    assert done["state"] == "succeeded" and done["circuits"] == 3
    counts = done["result"]["counts"]
    assert [set(c["c"]) <= {"00", "11"} for c in (counts[0], counts[2])] == [True, True]
    assert set(counts[1]["c"]) <= {"000", "111"}
    assert all(sum(c["c"].values()) == 64 for c in counts)


# -- bad input: each a clear coded error, and an audit row ------------------------------------

BAD_INPUTS = [
    ({"circuit": "OPENQASM 2.0;\nqreg q[1];\ncreg c[1];\nfoo q[0];\nmeasure q -> c;"}, "invalid_circuit"),
    (
        {"circuit": 'OPENQASM 2.0;\ninclude "/etc/passwd";\nqreg q[1];\ncreg c[1];\nmeasure q -> c;'},
        "invalid_circuit",
    ),
    ({"circuit": "qreg q[1];"}, "invalid_circuit"),
    ({"circuit": 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\nh q[0];'}, "invalid_circuit"),
    ({"circuit": "OPENQASM 2.0;\n" + "// pad\n" * 20_000}, "limit_exceeded"),
    (
        {"circuit": 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[40];\ncreg c[1];\nmeasure q[0] -> c[0];'},
        "limit_exceeded",
    ),
    ({"circuit": BELL2, "shots": 0}, "limit_exceeded"),
    ({"circuit": BELL2, "shots": 10_000_000}, "limit_exceeded"),
    ({"circuit": BELL2, "backend": "ibm/nowhere"}, "unsupported_backend"),
    ({"circuit": BELL2, "shots": "many"}, "invalid_arguments"),
    ({}, "invalid_arguments"),
    ({"circuit": BELL2, "circuits": [BELL2]}, "invalid_arguments"),
    ({"circuits": []}, "invalid_arguments"),
]


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize(("args", "code"), BAD_INPUTS)
async def test_bad_submissions_get_a_coded_error_and_leave_an_audit_row(
    gateway: Gateway, alice_key: str, mode: str, args: dict[str, Any], code: str
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as client:
        result = await client.call_tool("submit_job", args)
        listed = body(await client.call_tool("list_jobs", {}))
    assert result.is_error
    error = body(result)
    assert error["code"] == code, error
    assert error["message"] and "Traceback" not in error["message"]
    assert json.loads(result.content[0].text)["code"] == code  # the model reads the same body
    assert listed["jobs"] == []  # nothing was queued
    refused = [r for r in await audit_rows(gateway) if r.tool == "submit_job"]
    assert len(refused) == 1
    assert (refused[0].decision, refused[0].error_code, refused[0].agent) == ("refused", code, "alice")
    assert refused[0].args_hash and len(refused[0].args_hash) == 64


async def test_a_policy_cap_refuses_in_estimate_without_raising(config: Config, alice_key: str) -> None:
    config.policy_path.write_text("[defaults]\nmax_depth = 2\nmax_qubits = 2\n", encoding="utf-8")
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        estimate = body(await client.call_tool("estimate_job", {"circuit": BELL2}))
        refused = await client.call_tool("submit_job", {"circuit": BELL2})
        too_wide = await client.call_tool("estimate_job", {"circuit": GHZ3})
    assert estimate["admitted"] is False
    assert estimate["refusal"]["code"] == "limit_exceeded" and "depth" in estimate["refusal"]["message"]
    assert refused.is_error and body(refused)["code"] == "limit_exceeded"
    assert too_wide.is_error and body(too_wide)["code"] == "limit_exceeded"


async def test_a_backend_outside_the_policy_is_forbidden(config: Config, alice_key: str) -> None:
    config.policy_path.write_text('[defaults]\nallowed_backends = ["ibm/*"]\n', encoding="utf-8")
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        listing = body(await client.call_tool("list_backends", {}))
        refused = await client.call_tool("submit_job", {"circuit": BELL2})
    assert [b["allowed"] for b in listing["backends"] if b["id"] == "aer/simulator"] == [False]
    assert refused.is_error and body(refused)["code"] == "forbidden"


# -- authentication, scopes, isolation --------------------------------------------------------


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("key", [None, "", "qpg_000000000000_" + "x" * 43, "not-a-key"])
async def test_without_a_valid_key_every_tool_answers_unauthorized(
    gateway: Gateway, mode: str, key: str | None
) -> None:
    async with in_memory(gateway, key, mode=mode) as client:
        results = {
            "list_backends": await client.call_tool("list_backends", {}),
            "submit_job": await client.call_tool("submit_job", {"circuit": BELL2}),
            "get_job": await client.call_tool("get_job", {"job_id": "job_00000000000000000000"}),
            "get_usage": await client.call_tool("get_usage", {}),
        }
        with pytest.raises(MCPError):
            await client.read_resource("qpu://usage")
    for result in results.values():
        assert result.is_error
        error = body(result)
        assert error["code"] == "unauthorized" and "keys create" in error["message"]
    rows = await audit_rows(gateway)
    assert {r.tool for r in rows} >= set(results)
    assert all(r.decision == "refused" and r.error_code == "unauthorized" and r.agent is None for r in rows)


async def test_revoking_a_key_refuses_its_next_call(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        assert not (await client.call_tool("get_usage", {})).is_error
        key_id = alice_key.split("_")[1]
        assert await gateway.store.revoke_key(key_id, 0)
        after = await client.call_tool("get_usage", {})
    assert after.is_error and body(after)["code"] == "unauthorized" and "revoked" in body(after)["message"]


async def test_scopes_gate_each_tool(gateway: Gateway, config: Config) -> None:
    reader = await new_key(config.database, "reader", scopes="read")
    estimator = await new_key(config.database, "estimator", scopes="estimate")
    async with in_memory(gateway, reader) as client:
        submit = await client.call_tool("submit_job", {"circuit": BELL2})
        estimate = await client.call_tool("estimate_job", {"circuit": BELL2})
        usage = await client.call_tool("get_usage", {})
    assert body(submit)["code"] == "forbidden" and "'submit'" in body(submit)["message"]
    assert body(estimate)["code"] == "forbidden"
    assert not usage.is_error
    async with in_memory(gateway, estimator) as client:
        assert not (await client.call_tool("estimate_job", {"circuit": BELL2})).is_error
        assert body(await client.call_tool("list_jobs", {}))["code"] == "forbidden"
        with pytest.raises(MCPError, match="forbidden"):
            await client.read_resource("qpu://policy")


@pytest.mark.parametrize("mode", ERAS)
async def test_another_agents_job_is_not_found_exactly_like_a_missing_one(
    gateway: Gateway, alice_key: str, bob_key: str, mode: str
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as alice:
        job_id = body(await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))["job_id"]
    missing = "job_" + "0" * 20
    async with in_memory(gateway, bob_key, mode=mode) as bob:
        answers = {}
        for target in (job_id, missing):
            answers[target] = [
                await bob.call_tool("get_job", {"job_id": target}),
                await bob.call_tool("wait_for_job", {"job_id": target, "timeout_s": 1}),
                await bob.call_tool("cancel_job", {"job_id": target}),
            ]
            with pytest.raises(MCPError) as read:
                await bob.read_resource(f"qpu://jobs/{target}")
            answers[target].append(read.value.error.code)
        listed = body(await bob.call_tool("list_jobs", {}))
    assert listed["jobs"] == []
    for theirs, never in zip(answers[job_id][:3], answers[missing][:3], strict=True):
        assert body(theirs)["code"] == body(never)["code"] == "not_found"
        assert body(theirs)["message"].replace(job_id, "X") == body(never)["message"].replace(missing, "X")
    assert answers[job_id][3] == answers[missing][3]
    job = await gateway.store.get_job(job_id)
    assert job is not None and job.state != "cancelled"


# -- reading jobs ------------------------------------------------------------------------------


async def test_get_job_reports_timestamps_attempts_and_counts(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        done = await submit_and_wait(client, name="timing")
        again = body(await client.call_tool("get_job", {"job_id": done["job_id"]}))
    assert again == done
    assert again["name"] == "timing" and again["attempts"] == 1 and again["error"] is None
    assert again["created_at"] <= again["started_at"] <= again["finished_at"]
    assert again["created_at"].endswith("Z")


async def test_large_results_are_summarised_with_a_pointer_to_the_resource(gateway: Gateway, alice_key: str) -> None:
    wide = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[10];\ncreg c[10];\nh q;\nmeasure q -> c;\n'
    async with in_memory(gateway, alice_key) as client:
        job_id = body(await client.call_tool("submit_job", {"circuit": wide, "shots": 4000}))["job_id"]
        view = body(await client.call_tool("wait_for_job", {"job_id": job_id}))
        full = json.loads((await client.read_resource(f"qpu://jobs/{job_id}")).contents[0].text)
    assert view["result"]["truncated"] is True
    assert view["result"]["full_result_uri"] == f"qpu://jobs/{job_id}"
    assert len(view["result"]["counts"][0]["c"]) == 64
    assert full["result"]["truncated"] is False
    assert len(full["result"]["counts"][0]["c"]) > 64 and sum(full["result"]["counts"][0]["c"].values()) == 4000


async def test_list_jobs_pages_newest_first_with_a_cursor(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        ids = [body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 5}))["job_id"] for _ in range(5)]
        first = body(await client.call_tool("list_jobs", {"limit": 2}))
        second = body(await client.call_tool("list_jobs", {"limit": 2, "cursor": first["next_cursor"]}))
        third = body(await client.call_tool("list_jobs", {"limit": 2, "cursor": second["next_cursor"]}))
        bad_cursor = await client.call_tool("list_jobs", {"cursor": "garbage!"})
        bad_state = await client.call_tool("list_jobs", {"state": "exploded"})
        bad_limit = await client.call_tool("list_jobs", {"limit": 1000})
    paged = [j["job_id"] for page in (first, second, third) for j in page["jobs"]]
    assert paged == list(reversed(ids)) and third["next_cursor"] is None
    for refused in (bad_cursor, bad_state, bad_limit):
        assert body(refused)["code"] == "invalid_arguments"


async def test_usage_counts_jobs_and_shots_by_state(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        await submit_and_wait(client)
        await client.call_tool("submit_job", {"circuits": [BELL2, BELL3], "shots": 50})
        usage = body(await client.call_tool("get_usage", {}))
        resource = json.loads((await client.read_resource("qpu://usage")).contents[0].text)
    assert usage["total_jobs"] == 2 and usage["total_shots"] == 200
    assert resource["agent"] == "alice" and resource["total_jobs"] == 2


async def test_cancel_stops_a_queued_job_and_conflicts_on_a_finished_one(config: Config, alice_key: str) -> None:
    gateway = Gateway(config)
    async with gateway.running(workers=False), in_memory(gateway, alice_key) as client:
        job_id = body(await client.call_tool("submit_job", {"circuit": BELL2}))["job_id"]
        cancelled = body(await client.call_tool("cancel_job", {"job_id": job_id}))
        again = await client.call_tool("cancel_job", {"job_id": job_id})
    assert cancelled["state"] == "cancelled" and cancelled["terminal"] is True
    assert again.is_error and body(again) == {
        "code": "conflict",
        "message": body(again)["message"],
        "job_id": job_id,
    }
    rows = [r.tool for r in await gateway_rows(config)]
    assert "job.cancelled" in rows and rows.count("cancel_job") == 2


async def gateway_rows(config: Config) -> list[Any]:
    from qpu_gateway.store import open_store

    store = await open_store(config.database)
    try:
        return await store.audit_tail(limit=1000)
    finally:
        await store.close()


async def test_resources_list_and_read(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        uris = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        policy = json.loads((await client.read_resource("qpu://policy")).contents[0].text)
        backends = json.loads((await client.read_resource("qpu://backends")).contents[0].text)
        done = await submit_and_wait(client)
        job = json.loads((await client.read_resource(done["uri"])).contents[0].text)
    assert uris == {"qpu://backends", "qpu://usage", "qpu://policy"}
    assert templates == {"qpu://jobs/{job_id}"}
    assert (
        policy["agent"] == "alice"
        and policy["allowed_backends"] == ["aer/*", "faulty/*"]
        and policy["max_qubits"] == 24
    )
    assert backends["default_backend"] == "aer/simulator"
    assert job["job_id"] == done["job_id"] and job["state"] == "succeeded"
    reads = [r for r in await audit_rows(gateway) if r.tool.startswith("resources/read:")]
    assert len(reads) == 3 and all(r.decision == "ok" for r in reads)


async def test_the_prompt_walks_estimate_simulate_and_read(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        prompts = (await client.list_prompts()).prompts
        prompt = await client.get_prompt("run_circuit", {"goal": "make a GHZ state"})
    assert [p.name for p in prompts] == ["run_circuit"]
    text = prompt.messages[0].content.text
    for step in ("estimate_job", "submit_job", "wait_for_job", "aer/simulator", "GHZ"):
        assert step in text


async def test_every_call_leaves_exactly_one_audit_row(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        await client.call_tool("list_backends", {})
        await client.call_tool("estimate_job", {"circuit": BELL2})
        job_id = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10}))["job_id"]
        await client.call_tool("wait_for_job", {"job_id": job_id})
        await client.call_tool("get_job", {"job_id": job_id})
        await client.call_tool("no_such_tool", {})
    rows = await audit_rows(gateway)
    calls = [(r.tool, r.decision, r.error_code) for r in rows if not r.tool.startswith("job.")]
    assert calls == [
        ("list_backends", "ok", None),
        ("estimate_job", "ok", None),
        ("submit_job", "ok", None),
        ("wait_for_job", "ok", None),
        ("get_job", "ok", None),
        ("no_such_tool", "refused", "not_found"),
    ]
    submit = next(r for r in rows if r.tool == "submit_job")
    assert submit.job_id == job_id and submit.key_id == alice_key.split("_")[1]
    events = [r.tool for r in rows if r.job_id == job_id and r.tool.startswith("job.")]
    assert events == ["job.claimed", "job.succeeded"]  # Aer runs a job inside submit: no `running`
