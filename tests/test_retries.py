"""Provider faults: transient ones are retried with backoff, quota and permanent ones fail with their codes."""

from __future__ import annotations

from typing import Any

import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, in_memory

pytestmark = pytest.mark.anyio


async def run_on_faulty(config: Config, key: str, schedule: str, **overrides: Any) -> tuple[dict[str, Any], Gateway]:
    gateway = Gateway(Config(**{**config.__dict__, "faults": schedule, **overrides}))
    async with gateway.running(), in_memory(gateway, key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        done = await client.call_tool("wait_for_job", {"job_id": submitted.structured_content["job_id"]})
        events = await gateway.store.audit_tail(limit=100, job_id=submitted.structured_content["job_id"])
    view = dict(done.structured_content or {})
    view["events"] = [(r.tool, r.error_code) for r in events if r.tool.startswith("job.")]
    return view, gateway


async def test_transient_faults_are_retried_until_the_job_succeeds(config: Config, alice_key: str) -> None:
    view, gateway = await run_on_faulty(config, alice_key, "transient,transient")
    assert view["state"] == "succeeded" and view["attempts"] == 3
    assert view["events"] == [
        ("job.claimed", None),
        ("job.retry", None),  # each retry is a row of the job's timeline
        ("job.retry", None),
        ("job.running", None),
        ("job.succeeded", None),
    ]
    adapter = gateway.providers.adapters["faulty"]
    assert (adapter.submits, adapter.executions) == (3, 1)  # type: ignore[attr-defined]


async def test_transient_faults_past_the_retry_cap_fail_the_job(config: Config, alice_key: str) -> None:
    view, _ = await run_on_faulty(config, alice_key, "transient," * 4, retry_max_tries=3)
    assert view["state"] == "failed" and view["attempts"] == 3
    assert view["error"]["code"] == "provider_error" and "after 3 attempt(s)" in view["error"]["message"]


@pytest.mark.parametrize(("fault", "code"), [("quota", "quota_exhausted"), ("permanent", "provider_error")])
async def test_quota_and_permanent_faults_fail_at_once_with_their_code(
    config: Config, alice_key: str, fault: str, code: str
) -> None:
    view, gateway = await run_on_faulty(config, alice_key, fault)
    assert view["state"] == "failed" and view["attempts"] == 1
    assert view["error"]["code"] == code
    assert view["events"][-1] == ("job.failed", code)
    assert gateway.providers.adapters["faulty"].executions == 0  # type: ignore[attr-defined]
