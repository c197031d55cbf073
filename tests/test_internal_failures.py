"""Failures of the gateway itself are never charged to a job, and a provider that cannot list is asked again.

The faults come from the test-only `faulty/qpu` backend: `internal` in its schedule raises what a
half-imported SDK raised in a real run (an ImportError) before anything reaches the provider, and
a file `unlisted` in its folder makes listing fail the same way while it exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from qpu_gateway.adapters import azure, braket, ibm, qasm
from qpu_gateway.config import Config
from qpu_gateway.errors import Unavailable
from qpu_gateway.jobs import providers
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, body, eventually, in_memory

pytestmark = pytest.mark.anyio


def faulty_config(config: Config, schedule: str, **overrides: Any) -> Config:
    return Config(**{**config.__dict__, "faults": schedule, "internal_retry_base_s": 0.2, **overrides})


async def job_trail(gateway: Gateway, job_id: str) -> list[tuple[str, str | None, float]]:
    rows = await gateway.store.audit_tail(limit=100, job_id=job_id)
    return [(r.tool, r.error_code, r.at) for r in rows if r.tool.startswith("job.")]


async def test_a_job_hit_by_an_internal_failure_runs_again_and_succeeds_uncharged_by_it(
    config: Config, alice_key: str
) -> None:
    gateway = Gateway(faulty_config(config, "internal,ok"))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
        trail = await job_trail(gateway, job_id)
        job = await gateway.store.get_job(job_id)
    view = done.structured_content
    assert view["state"] == "succeeded" and view["error"] is None, view
    assert [(tool, code) for tool, code, _ in trail] == [
        ("job.claimed", None),
        ("job.requeued", "internal_error"),
        ("job.claimed", None),
        ("job.running", None),
        ("job.succeeded", None),
    ]
    requeued_at, claimed_again_at = trail[1][2], trail[2][2]
    assert claimed_again_at - requeued_at >= 0.2  # it waited before running again
    assert job is not None and job.internal_failures == 1 and job.attempts == 2


async def test_a_job_waiting_after_an_internal_failure_says_so_and_when_it_runs_again(
    config: Config, alice_key: str
) -> None:
    gateway = Gateway(faulty_config(config, "internal,ok", internal_retry_base_s=2.0))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        views: list[dict[str, Any]] = []

        async def waiting() -> bool:
            views.append((await client.call_tool("get_job", {"job_id": job_id})).structured_content)
            return views[-1]["error"] is not None

        await eventually(waiting, within_s=10, every=0.05)
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
    held = views[-1]
    assert held["state"] == "queued" and not held["terminal"]
    assert held["error"]["code"] == "internal_error"
    assert "runs again from" in held["error"]["message"] and "failure 1 of at most 5" in held["error"]["message"]
    assert done.structured_content["state"] == "succeeded" and done.structured_content["error"] is None


async def test_a_job_that_keeps_hitting_internal_failures_fails_after_the_bound_with_waits_growing_and_no_charge(
    config: Config, alice_key: str
) -> None:
    config.policy_path.write_text(
        config.policy_path.read_text() + '\n[defaults.agent_quota]\ncost_usd = { day = "1.00" }\n', encoding="utf-8"
    )
    gateway = Gateway(faulty_config(config, "internal,internal,internal", internal_retry_max=3))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30})
        trail = await job_trail(gateway, job_id)
        usage = (await client.call_tool("get_usage", {})).structured_content
    view = done.structured_content
    assert view["state"] == "failed" and view["error"]["code"] == "internal_error"
    assert "failed 3 times" in view["error"]["message"] and "nothing was charged" in view["error"]["message"]
    assert "ImportError" in view["error"]["message"] and "partially initialized" not in view["error"]["message"]
    tools = [(tool, code) for tool, code, _ in trail]
    assert tools == [
        ("job.claimed", None),
        ("job.requeued", "internal_error"),
        ("job.claimed", None),
        ("job.requeued", "internal_error"),
        ("job.claimed", None),
        ("job.failed", "internal_error"),
    ]
    waits = [trail[i + 1][2] - trail[i][2] for i in (1, 3)]
    assert waits[0] >= 0.2 and waits[1] >= 0.4  # 0.2 s, then 0.4 s: no hot loop
    cost_day = next(q for q in usage["quotas"] if (q["scope"], q["dimension"], q["period"]) == ("agent", "cost", "day"))
    assert cost_day["reserved"] == 0 and cost_day["committed"] == 0
    assert gateway.providers.adapters["faulty"].executions == 0  # type: ignore[attr-defined]


async def test_no_worker_of_any_process_claims_a_requeued_job_before_its_time(config: Config, alice_key: str) -> None:
    first = Gateway(faulty_config(config, "internal", internal_retry_base_s=3.0))
    async with first.running(), in_memory(first, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]

        async def requeued() -> bool:
            job = await first.store.get_job(job_id)
            return job is not None and job.internal_failures == 1

        await eventually(requeued, within_s=10, every=0.05)
    second = Gateway(faulty_config(config, "ok"))
    async with second.running():
        await anyio.sleep(1.0)  # several claim rounds of a fresh process, well before the 3 s are up
        waiting = await second.store.get_job(job_id)
        assert waiting is not None and waiting.state.value == "queued" and waiting.runs == 1

        async def succeeded() -> bool:
            job = await second.store.get_job(job_id)
            return job is not None and job.state.value == "succeeded"

        await eventually(succeeded, within_s=20)
        job = await second.store.get_job(job_id)
        claims = [at for tool, _, at in await job_trail(second, job_id) if tool == "job.claimed"]
    assert job is not None and job.not_before is not None
    assert len(claims) == 2 and claims[1] >= job.not_before


def test_no_adapter_classifies_a_failure_of_the_gateway_as_the_providers() -> None:
    half_imported = ImportError("cannot import name 'DAGCircuit' from partially initialized module")
    for classify in (ibm.classify, braket.classify, azure.classify):
        with pytest.raises(ImportError):
            classify(half_imported)


def test_a_parser_that_fails_to_import_is_not_an_invalid_circuit(monkeypatch: pytest.MonkeyPatch) -> None:
    def half_imported(_: str, **__: Any) -> Any:
        raise ImportError("cannot import name 'ClassicalRegister' from partially initialized module 'qiskit.circuit'")

    import qiskit.qasm2

    monkeypatch.setattr(qiskit.qasm2, "loads", half_imported)
    with pytest.raises(ImportError):
        qasm.load(BELL2)


# -- listings --------------------------------------------------------------------------------------


@pytest.fixture
def quick_relist(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(providers, "LIST_RETRY_S", 0.3)
    return 0.3


async def test_a_provider_that_cannot_list_answers_unavailable_and_is_asked_again_soon(
    config: Config, alice_key: str, tmp_path: Path, quick_relist: float
) -> None:
    faults = tmp_path / "provider"
    gateway = Gateway(faulty_config(config, "ok", faults_dir=faults))
    (faults / "unlisted").touch()
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        refused = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        listed = (await client.call_tool("list_backends", {})).structured_content["backends"]
        (faults / "unlisted").unlink()
        await anyio.sleep(quick_relist + 0.1)
        listed_again = (await client.call_tool("list_backends", {})).structured_content["backends"]
        admitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        done = await client.call_tool("wait_for_job", {"job_id": admitted.structured_content["job_id"]})
        aer = await client.call_tool("submit_job", {"circuit": BELL2})  # the other providers were never affected
    assert refused.is_error
    refusal = body(refused)
    assert refusal["code"] == "unavailable" and 0 < refusal["retry_after_s"] <= quick_relist + 1, refusal
    assert "faulty cannot say which backends it offers right now" in refusal["message"]
    assert "ImportError" in refusal["message"] and "partially initialized" not in refusal["message"]
    entry = next(b for b in listed if b["provider"] == "faulty")
    assert (entry["id"], entry["status"]) == ("faulty/*", "unavailable") and "asked again in" in entry["reason"]
    assert any(b["id"] == "aer/simulator" and b["status"] == "online" for b in listed)
    assert next(b for b in listed_again if b["provider"] == "faulty")["id"] == "faulty/qpu"
    assert not admitted.is_error and done.structured_content["state"] == "succeeded"
    assert not aer.is_error


async def test_a_failed_listing_is_not_asked_again_on_every_call_during_the_back_off(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(providers, "LIST_RETRY_S", 30.0)
    faults = tmp_path / "provider"
    faulty = Gateway(faulty_config(config, "ok", faults_dir=faults)).providers.adapters["faulty"]
    calls = 0
    listing = faulty.backends

    async def counted() -> Any:
        nonlocal calls
        calls += 1
        return await listing()

    faulty.backends = counted  # type: ignore[method-assign]
    only_faulty = providers.Providers(config, adapters={"faulty": faulty})
    (faults / "unlisted").touch()
    for _ in range(10):
        (entry,) = await only_faulty.backends()
        with pytest.raises(Unavailable) as refused:
            await only_faulty.backend("faulty/qpu")
    assert calls == 1  # the failure was asked once, and answered from the back-off since
    assert entry.id == "faulty/*" and entry.retry_after_s is not None and entry.retry_after_s <= 30
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s <= 30
