"""Each policy rule through a real MCP client session: its refusal code, its message, its audit row."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp_types import ElicitRequestParams, ElicitResult

from qpu_gateway.config import Config
from qpu_gateway.jobs.approvals import approve
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.mcp.app import build_server
from qpu_gateway.store import open_store

from .support import BELL2, BELL3, ERAS, body, eventually, in_memory, new_key

pytestmark = pytest.mark.anyio

# The fault-injecting backend stands in for priced hardware: $6.00 a task, no per-shot fee.
HARDWARE = "faulty/qpu"
GHZ3 = BELL2.replace("qreg q[2];\ncreg c[2];", "qreg q[3];\ncreg c[3];").replace(
    "cx q[0], q[1];", "cx q[0], q[1];\ncx q[1], q[2];"
)
PRICED = """
[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "6.00"
per_shot_usd = "0"
"""


def policy(config: Config, defaults: str, extra: str = PRICED) -> None:
    config.policy_path.write_text(
        '[defaults]\nallowed_backends = ["aer/*", "faulty/*"]\n'
        "loop_guard = { max_repeats = 1000, window_minutes = 1 }\n" + defaults + "\n" + extra,
        encoding="utf-8",
    )


def hardware(config: Config, **overrides: Any) -> Gateway:
    return Gateway(Config(**{**config.__dict__, "faults": "ok", "approval_sweep_s": 0.2, **overrides}))


async def ledger(config: Config, agent: str = "alice") -> tuple[dict[str, Any], dict[str, Any]]:
    """(committed, reserved) per period for the agent, read straight from the database file."""
    store = await open_store(config.database)
    try:
        totals = await store.ledger_totals("agent", agent, time.time())
    finally:
        await store.close()
    return totals.committed, totals.reserved


async def rows(config: Config, **filters: Any) -> list[Any]:
    store = await open_store(config.database)
    try:
        return await store.audit_tail(limit=10_000, **filters)
    finally:
        await store.close()


# -- rate limits --------------------------------------------------------------------------------


async def test_a_rate_limit_in_reject_mode_answers_rate_limited_with_retry_after(
    config: Config, alice_key: str
) -> None:
    policy(config, 'rate_limits = [{ limit = "3/minute", per = "agent", tools = ["get_usage"] }]')
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        answers = [await client.call_tool("get_usage", {}) for _ in range(5)]
        other_tool = await client.call_tool("list_jobs", {})
    assert [a.is_error for a in answers] == [False, False, False, True, True]
    refused = body(answers[3])
    assert refused["code"] == "rate_limited" and 0 < refused["retry_after_s"] <= 60
    assert "3/minute" in refused["message"]
    assert not other_tool.is_error  # the rule counts get_usage only
    usage_rows = [(r.decision, r.error_code) for r in await rows(config) if r.tool == "get_usage"]
    assert usage_rows == [("ok", None)] * 3 + [("refused", "rate_limited")] * 2


async def test_a_rate_limit_in_wait_mode_holds_the_call_with_progress_then_admits(
    config: Config, alice_key: str
) -> None:
    policy(config, 'rate_limits = [{ limit = "1/2second", per = "agent", tools = ["get_usage"], mode = "wait" }]')
    gateway = Gateway(config)
    reports: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append(message)

    async with gateway.running(), in_memory(gateway, alice_key) as client:
        first = await client.call_tool("get_usage", {})
        started = time.monotonic()
        second = await client.call_tool("get_usage", {}, progress_callback=on_progress)
        waited = time.monotonic() - started
    assert not first.is_error and not second.is_error
    assert waited > 0.5  # it was held, not refused
    assert reports and "waiting" in (reports[0] or "")


async def test_a_shots_rate_limit_counts_shots_per_project(config: Config, alice_key: str) -> None:
    policy(config, 'rate_limits = [{ limit = "1000/hour", per = "project", cost = "shots" }]')
    gateway = Gateway(config)
    bob = await new_key(config.database, "bob")  # same project "default"
    async with gateway.running():
        async with in_memory(gateway, alice_key) as alice:
            assert not (await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 600})).is_error
        async with in_memory(gateway, bob) as client:
            refused = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 600})
            fits = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 400})
    assert body(refused)["code"] == "rate_limited" and not fits.is_error


# -- prices, estimates, approvals ---------------------------------------------------------------


async def test_estimate_reports_cost_qpu_seconds_approval_and_quota_left(config: Config, alice_key: str) -> None:
    policy(config, 'confirm_above_usd = "5.00"\nagent_quota = { cost_usd = { day = "20.00" } }')
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        estimate = body(await client.call_tool("estimate_job", {"circuit": BELL2, "backend": HARDWARE, "shots": 100}))
        free = body(await client.call_tool("estimate_job", {"circuit": BELL2}))
        too_dear = body(
            await client.call_tool("estimate_job", {"circuit": BELL2, "backend": HARDWARE, "max_cost_usd": "5.99"})
        )
    assert estimate["cost_micro_usd"] == 6_000_000 and estimate["cost_usd"] == "$6.00"
    assert estimate["pricing_known"] is True and estimate["qpu_seconds"] > 0
    assert estimate["approval"] == "person" and estimate["admitted"] is True
    assert {
        "scope": "agent",
        "dimension": "cost",
        "period": "day",
        "limit": 20_000_000,
        "remaining_after": 14_000_000,
    } in estimate["quota_after"]
    assert free["cost_micro_usd"] == 0 and free["approval"] == "none" and free["qpu_seconds"] == 0
    assert too_dear["admitted"] is False and too_dear["refusal"]["code"] == "limit_exceeded"
    assert too_dear["refusal"]["rule"] == "max_cost_usd"


async def test_max_cost_usd_refuses_before_anything_is_reserved(config: Config, alice_key: str) -> None:
    policy(config, "")
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        refused = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "max_cost_usd": 5})
        committed, reserved = await ledger(config)
    assert body(refused)["code"] == "limit_exceeded" and "$6.00" in body(refused)["message"]
    assert committed == {} and reserved == {}


async def test_an_unknown_price_needs_an_operator_or_is_refused(config: Config, alice_key: str) -> None:
    policy(config, "", extra='[prices."faulty/*"]\nmodel = "per_task_shot"\nknown = false\n')
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        estimate = body(await client.call_tool("estimate_job", {"circuit": BELL2, "backend": HARDWARE}))
        held = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
    assert estimate["pricing_known"] is False and estimate["cost_usd"] == "unknown"
    assert estimate["approval"] == "operator"
    assert body(held)["code"] == "approval_required" and body(held)["job_id"]
    policy(config, 'unknown_price = "refuse"', extra='[prices."faulty/*"]\nmodel = "per_task_shot"\nknown = false\n')
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        refused = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
    assert body(refused)["code"] == "forbidden" and "price" in body(refused)["message"]


def elicitation(answer: str, seen: list[str]) -> Any:
    async def callback(context: Any, params: ElicitRequestParams) -> ElicitResult:
        seen.append(params.message)
        if answer == "accept":
            return ElicitResult(action="accept", content={"approve": True})
        if answer == "no":
            return ElicitResult(action="accept", content={"approve": False})
        return ElicitResult(action=answer)  # type: ignore[arg-type]

    return callback


@pytest.mark.parametrize("mode", ERAS)
async def test_a_person_approves_a_costly_job_through_elicitation(config: Config, alice_key: str, mode: str) -> None:
    policy(config, 'confirm_above_usd = "5.00"\nagent_quota = { cost_usd = { day = "100.00" } }')
    gateway = hardware(config)
    asked: list[str] = []
    async with gateway.running():
        server = build_server(gateway, lambda: alice_key)
        async with Client(server, mode=mode, elicitation_callback=elicitation("accept", asked)) as client:  # type: ignore[arg-type]
            submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE}))
            done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
        committed, reserved = await ledger(config)
        admission = [r for r in await rows(config, job_id=submitted["job_id"]) if r.tool == "submit_job"]
    assert len(asked) == 1
    assert "faulty/qpu" in asked[0] and "$6.00" in asked[0] and "$94.00" in asked[0]  # backend, cost, budget left
    assert done["state"] == "succeeded"
    assert committed["day"][0] == 6_000_000 and reserved == {}
    assert admission[-1].detail == "approved by person, through alice's client"


@pytest.mark.parametrize("mode", ERAS)
@pytest.mark.parametrize("answer", ["decline", "cancel", "no"])
async def test_a_person_who_says_no_denies_the_job_and_nothing_is_reserved(
    config: Config, alice_key: str, mode: str, answer: str
) -> None:
    policy(config, 'confirm_above_usd = "5.00"')
    gateway = hardware(config)
    async with gateway.running():
        server = build_server(gateway, lambda: alice_key)
        async with Client(server, mode=mode, elicitation_callback=elicitation(answer, [])) as client:  # type: ignore[arg-type]
            denied = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
            listed = body(await client.call_tool("list_jobs", {}))
        committed, reserved = await ledger(config)
        audit = [(r.decision, r.error_code) for r in await rows(config) if r.tool == "submit_job"]
    assert body(denied)["code"] == "approval_denied"
    assert listed["jobs"] == [] and committed == {} and reserved == {}
    assert audit[-1] == ("refused", "approval_denied")


@pytest.mark.parametrize("mode", ERAS)
async def test_a_client_that_cannot_ask_gets_approval_required_and_an_operator_decides(
    config: Config, alice_key: str, mode: str
) -> None:
    policy(config, 'confirm_above_usd = "5.00"')
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key, mode=mode) as client:
        held = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
        job_id = body(held)["job_id"]
        pending = body(await client.call_tool("get_job", {"job_id": job_id}))
        _, reserved = await ledger(config)
        await approve(gateway.store, job_id, by="ops")
        done = body(await client.call_tool("wait_for_job", {"job_id": job_id}))
        committed, reserved_after = await ledger(config)
        trail = [r.tool for r in await rows(config, job_id=job_id) if r.tool not in ("get_job", "wait_for_job")]
    assert body(held)["code"] == "approval_required" and "qpu-gateway approvals approve" in body(held)["message"]
    assert pending["state"] == "pending_approval" and reserved["day"][0] == 6_000_000
    assert done["state"] == "succeeded" and committed["day"][0] == 6_000_000 and reserved_after == {}
    assert trail[:3] == ["submit_job", "approvals.approve", "job.claimed"]


async def test_above_the_operator_threshold_only_an_operator_can_approve(config: Config, alice_key: str) -> None:
    policy(config, 'confirm_above_usd = "1.00"\noperator_above_usd = "5.00"')
    gateway = hardware(config)
    asked: list[str] = []
    async with gateway.running():
        server = build_server(gateway, lambda: alice_key)
        async with Client(server, mode="legacy", elicitation_callback=elicitation("accept", asked)) as client:  # type: ignore[arg-type]
            held = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
    assert body(held)["code"] == "approval_required" and "an operator" in body(held)["message"]
    assert asked == []  # the person was not even asked


async def test_a_pending_approval_expires_and_releases_its_reservation(config: Config, alice_key: str) -> None:
    policy(config, 'confirm_above_usd = "5.00"\napproval_ttl = "1s"')
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        job_id = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE}))["job_id"]
        done = body(await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 10}))
        committed, reserved = await ledger(config)
    assert done["state"] == "expired" and reserved == {} and committed == {}


# -- guards -------------------------------------------------------------------------------------


async def test_an_idempotency_key_returns_the_same_job_and_conflicts_on_another_payload(
    gateway: Gateway, config: Config, alice_key: str
) -> None:
    async with in_memory(gateway, alice_key) as client:
        first = body(await client.call_tool("submit_job", {"circuit": BELL2, "idempotency_key": "exp-1"}))
        again = body(await client.call_tool("submit_job", {"circuit": BELL2, "idempotency_key": "exp-1"}))
        other = await client.call_tool("submit_job", {"circuit": BELL3, "idempotency_key": "exp-1"})
        listed = body(await client.call_tool("list_jobs", {}))
    assert again["job_id"] == first["job_id"] and again["idempotent_replay"] is True
    assert body(other)["code"] == "conflict" and body(other)["job_id"] == first["job_id"]
    assert len(listed["jobs"]) == 1
    committed, reserved = await ledger(config)
    assert sum(v[1] for v in committed.values()) + sum(v[1] for v in reserved.values()) == 3 * 1024  # one job


async def test_the_same_circuit_again_and_again_is_a_loop(config: Config, alice_key: str) -> None:
    config.policy_path.write_text(
        "[defaults]\nloop_guard = { max_repeats = 3, window_minutes = 5 }\n", encoding="utf-8"
    )
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        answers = [await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10}) for _ in range(4)]
        different = await client.call_tool("submit_job", {"circuit": GHZ3, "shots": 10})
    assert [a.is_error for a in answers] == [False, False, False, True]
    assert body(answers[3])["code"] == "loop_detected" and body(answers[3])["retry_after_s"] == 300
    assert not different.is_error


async def test_priority_above_the_ceiling_is_forbidden(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        high = await client.call_tool("submit_job", {"circuit": BELL2, "priority": "high"})
        low = await client.call_tool("submit_job", {"circuit": BELL2, "priority": "low"})
        odd = await client.call_tool("submit_job", {"circuit": BELL2, "priority": "urgent"})
    assert body(high)["code"] == "forbidden" and "normal" in body(high)["message"]
    assert not low.is_error and body(odd)["code"] == "invalid_arguments"


async def test_higher_priority_first_then_agents_take_turns(config: Config, alice_key: str, bob_key: str) -> None:
    config.policy_path.write_text(
        '[defaults]\npriority_ceiling = "high"\nloop_guard = { max_repeats = 100 }\n', encoding="utf-8"
    )
    gateway = Gateway(Config(**{**config.__dict__, "per_backend_concurrency": 1}))
    async with gateway.running(workers=False):
        async with in_memory(gateway, alice_key) as alice:
            alice_jobs = [
                body(await alice.call_tool("submit_job", {"circuit": BELL2, "shots": 5}))["job_id"] for _ in range(6)
            ]
        async with in_memory(gateway, bob_key) as bob:
            bob_job = body(await bob.call_tool("submit_job", {"circuit": BELL2, "shots": 5}))["job_id"]
            urgent = body(await bob.call_tool("submit_job", {"circuit": BELL3, "shots": 5, "priority": "high"}))[
                "job_id"
            ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(gateway.workers.run)

            async def last_done() -> bool:
                job = await gateway.store.get_job(alice_jobs[-1])
                return job is not None and job.state.value == "succeeded"

            await eventually(last_done, within_s=60)
            tg.cancel_scope.cancel()
        order = [r.job_id for r in await rows(config) if r.tool == "job.claimed"]
    assert order[0] == urgent  # high priority first
    assert order.index(bob_job) <= 2  # bob's one job does not wait behind alice's six
    assert [j for j in order if j in alice_jobs] == alice_jobs  # each agent's own jobs in order


# -- dry runs and simulate-first ----------------------------------------------------------------


async def test_a_dry_run_runs_free_on_aer_against_the_target(config: Config, alice_key: str) -> None:
    policy(config, "")
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "dry_run": True}))
        done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
    assert submitted["estimate"]["runs_on"] == "aer/simulator" and submitted["estimate"]["cost_micro_usd"] == 0
    assert done["backend"] == "aer/simulator" and done["state"] == "succeeded"
    assert gateway.providers.adapters["faulty"].submits == 0  # type: ignore[attr-defined]


async def test_simulate_first_requires_a_succeeded_simulation_of_the_circuit(config: Config, alice_key: str) -> None:
    policy(config, "simulate_first = true", extra='[prices."faulty/*"]\nmodel = "free"\n')
    gateway = hardware(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        refused = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
        dry = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE, "dry_run": True}))
        await client.call_tool("wait_for_job", {"job_id": dry["job_id"]})
        admitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE})
        other = await client.call_tool("submit_job", {"circuit": GHZ3, "backend": HARDWARE})
    assert body(refused)["code"] == "simulation_required" and "dry_run" in body(refused)["message"]
    assert not admitted.is_error
    assert body(other)["code"] == "simulation_required"


# -- hot reload, the caller's policy, keys -------------------------------------------------------


async def test_a_policy_edit_applies_without_a_restart_and_a_bad_one_is_refused(config: Config, alice_key: str) -> None:
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        assert not (await client.call_tool("submit_job", {"circuit": BELL2, "shots": 500})).is_error
        config.policy_path.write_text("[defaults]\nmax_shots = 100\n", encoding="utf-8")

        async def refused() -> bool:
            return bool((await client.call_tool("submit_job", {"circuit": BELL2, "shots": 500})).is_error)

        await eventually(refused, within_s=10, every=0.2)
        config.policy_path.write_text("[defaults]\nmax_shots = 'lots'\n", encoding="utf-8")
        await anyio.sleep(2.5)
        still = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 500})
        policy_now = json.loads((await client.read_resource("qpu://policy")).contents[0].text)
    assert body(still)["code"] == "limit_exceeded"  # the last good policy stays in force
    assert policy_now["max_shots"] == 100
    assert "line 2" in (gateway.policy_source.last_error or "")


async def test_the_policy_resource_shows_the_callers_merged_levels(config: Config) -> None:
    config.policy_path.write_text(
        "[defaults]\nmax_shots = 1000\n[projects.lab]\nmax_shots = 2000\nmax_depth = 50\n"
        "[agents.carol]\nmax_shots = 3000\n",
        encoding="utf-8",
    )
    carol = await new_key(config.database, "carol", project="lab")
    dave = await new_key(config.database, "dave", project="lab")
    gateway = Gateway(config)
    async with gateway.running():
        views = {}
        for name, key in (("carol", carol), ("dave", dave)):
            async with in_memory(gateway, key) as client:
                views[name] = json.loads((await client.read_resource("qpu://policy")).contents[0].text)
    assert (views["carol"]["max_shots"], views["carol"]["max_depth"]) == (3000, 50)
    assert (views["dave"]["max_shots"], views["dave"]["max_depth"]) == (2000, 50)


async def test_a_rotated_key_stops_at_once_and_the_new_one_works(gateway: Gateway, config: Config) -> None:
    from qpu_gateway.keys import rotate_key

    old = await new_key(config.database, "erin")
    new = await rotate_key(gateway.store, old.split("_")[1])
    async with in_memory(gateway, old) as client:
        refused = await client.call_tool("get_usage", {})
    async with in_memory(gateway, new) as client:
        fine = await client.call_tool("get_usage", {})
    assert body(refused)["code"] == "unauthorized" and not fine.is_error
    (record,) = [k for k in await gateway.store.list_keys() if k.agent == "erin"]
    assert record.last_used_at is not None


async def test_a_replayed_idempotency_key_counts_no_shots_again(config: Config, alice_key: str) -> None:
    policy(config, 'rate_limits = [{ limit = "1000/hour", per = "agent", cost = "shots" }]')
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        first = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 800, "idempotency_key": "k"}))
        again = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 800, "idempotency_key": "k"}))
    assert again["job_id"] == first["job_id"] and again["idempotent_replay"] is True


async def test_running_jobs_caps_how_many_of_an_agents_jobs_run_at_once(config: Config, alice_key: str) -> None:
    policy(config, "agent_quota = { running_jobs = 1 }", extra='[prices."faulty/*"]\nmodel = "free"\n')
    gateway = Gateway(
        Config(**{**config.__dict__, "faults": "slow:0.4,slow:0.4,slow:0.4", "per_backend_concurrency": 3})
    )
    most = 0
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        ids = [
            body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": HARDWARE}))["job_id"]
            for _ in range(3)
        ]

        async def all_done() -> bool:
            nonlocal most
            jobs = [await gateway.store.get_job(i) for i in ids]
            most = max(most, sum(1 for j in jobs if j is not None and j.state.value in ("submitting", "running")))
            return all(j is not None and j.state.value == "succeeded" for j in jobs)

        await eventually(all_done, within_s=30, every=0.05)
    assert most == 1


@pytest.mark.parametrize("mode", ERAS)
async def test_the_prompt_needs_a_key_too(gateway: Gateway, mode: str) -> None:
    from mcp.shared.exceptions import MCPError

    async with in_memory(gateway, None, mode=mode) as client:
        with pytest.raises(MCPError, match="unauthorized"):
            await client.get_prompt("run_circuit", {})
