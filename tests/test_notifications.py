"""Progress while waiting, and resource updates for subscribers of both protocol eras."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.subscriptions import ResourceUpdated
from mcp.shared.exceptions import MCPError
from mcp_types import ResourceUpdatedNotification

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import JobState
from qpu_gateway.mcp.app import build_server

from .support import BELL2, ERAS, eventually, in_memory

pytestmark = pytest.mark.anyio


def faulty_config(config: Config, schedule: str) -> Config:
    """The same gateway with the fault-injecting adapter enabled and allowed by the policy."""
    return Config(**{**config.__dict__, "faults": schedule})


@pytest.mark.parametrize("mode", ERAS)
async def test_wait_for_job_reports_progress_at_each_state_change(config: Config, alice_key: str, mode: str) -> None:
    gateway = Gateway(faulty_config(config, "slow:0.6"))
    reports: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reports.append((progress, message))

    async with gateway.running(), in_memory(gateway, alice_key, mode=mode) as client:
        job_id = (await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})).structured_content[
            "job_id"
        ]
        done = await client.call_tool("wait_for_job", {"job_id": job_id}, progress_callback=on_progress)
    assert done.structured_content["state"] == "succeeded"
    steps = [p for p, _ in reports]
    assert steps == sorted(set(steps)) and len(steps) >= 3  # strictly increasing, one per change seen
    messages = [m or "" for _, m in reports]
    assert "queued" in messages[0] or "submitting" in messages[0]
    assert any("submitting" in m for m in messages)
    assert messages[-1].endswith("succeeded")


async def test_a_legacy_subscriber_gets_an_update_for_each_state_change(config: Config, alice_key: str) -> None:
    gateway = Gateway(config)
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(message.params.uri)

    async with gateway.running(workers=False):
        server = build_server(gateway, lambda: alice_key)
        async with Client(server, mode="legacy", message_handler=on_message) as client:  # type: ignore[arg-type]
            submitted = (await client.call_tool("submit_job", {"circuit": BELL2})).structured_content
            await client.subscribe_resource(submitted["uri"])
            async with anyio.create_task_group() as tg:
                tg.start_soon(gateway.workers.run)
                done = await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]})
                tg.cancel_scope.cancel()
            # The last update travels to the session on its own, and may land after wait_for_job's
            # answer (on a loaded machine, more than 0.2 s after): wait for it, then for any extra.
            await eventually(lambda: _at_least(updates, 2), within_s=10)
            await anyio.sleep(0.2)
    assert done.structured_content["state"] == "succeeded"
    # queued -> submitting (claimed) -> succeeded (Aer runs a job inside submit, so it is never
    # waiting at a provider in `running`): two changes after subscribing
    assert updates == [submitted["uri"]] * 2


async def _at_least(seen: list[str], count: int) -> bool:
    return len(seen) >= count


async def test_a_2026_listener_gets_an_update_for_each_state_change(config: Config, alice_key: str) -> None:
    gateway = Gateway(config)
    events: list[str] = []
    async with gateway.running(workers=False), in_memory(gateway, alice_key, mode="2026-07-28") as client:
        submitted = (await client.call_tool("submit_job", {"circuit": BELL2})).structured_content
        async with client.listen(resource_subscriptions=[submitted["uri"]]) as sub:

            async def collect() -> None:
                async for event in sub:
                    if isinstance(event, ResourceUpdated):
                        events.append(event.uri)
                        if (await client.call_tool("get_job", {"job_id": submitted["job_id"]})).structured_content[
                            "terminal"
                        ]:
                            return

            async with anyio.create_task_group() as tg:
                tg.start_soon(gateway.workers.run)
                with anyio.fail_after(30):
                    await collect()
                tg.cancel_scope.cancel()
    assert events and set(events) == {submitted["uri"]}
    assert 1 <= len(events) <= 3  # identical pending events may coalesce on the client (SDK docs)


@pytest.mark.parametrize("mode", ERAS)
async def test_another_agent_cannot_subscribe_to_a_job(
    gateway: Gateway, alice_key: str, bob_key: str, mode: str
) -> None:
    async with in_memory(gateway, alice_key, mode=mode) as alice:
        uri = (await alice.call_tool("submit_job", {"circuit": BELL2})).structured_content["uri"]
    async with in_memory(gateway, bob_key, mode=mode) as bob:
        with pytest.raises(MCPError, match="not_found"):
            if mode == "legacy":
                await bob.subscribe_resource(uri)
            else:
                async with bob.listen(resource_subscriptions=[uri]):
                    pass
    refused = [r for r in await gateway.store.audit_tail(limit=100) if r.agent == "bob"]
    assert [(r.decision, r.error_code) for r in refused] == [("refused", "not_found")]


async def test_a_subscriber_hears_of_changes_made_by_another_process(config: Config, alice_key: str) -> None:
    """Two gateways on one database: the job runs in one, the subscriber is connected to the other."""
    watcher, runner = Gateway(config), Gateway(config)
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(message.params.uri)

    async with watcher.running(workers=False):
        server = build_server(watcher, lambda: alice_key)
        async with Client(server, mode="legacy", message_handler=on_message) as client:  # type: ignore[arg-type]
            submitted = (await client.call_tool("submit_job", {"circuit": BELL2})).structured_content
            await client.subscribe_resource(submitted["uri"])
            async with runner.running():
                done = await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]})
                await anyio.sleep(3 * config.poll_interval_s)
    assert done.structured_content["state"] == "succeeded"
    assert updates and set(updates) == {submitted["uri"]}
    assert not watcher.events._legacy  # forgotten once the job ended


async def test_a_wait_that_ends_unfinished_answers_with_the_job_as_stored_not_as_this_process_last_saw_it(
    config: Config, alice_key: str, tmp_path: Path
) -> None:
    """A wait starts from the job as this process last changed it (no read), but an answer that has
    not ended is read: here another process has taken the job to its provider meanwhile."""
    held = Config(**{**config.__dict__, "faults": "hold:60", "faults_dir": tmp_path / "books"})
    watcher, runner = Gateway(held), Gateway(held)
    async with watcher.running(workers=False), in_memory(watcher, alice_key) as client:
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        async with runner.running():

            async def running_at_the_provider() -> bool:
                job = await runner.store.get_job(job_id)
                return job is not None and job.state is JobState.RUNNING

            await eventually(running_at_the_provider)
            noted = watcher.events.recent(job_id)
            assert noted is not None and noted.state is JobState.QUEUED  # what this process last did to it
            answer = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 0.000001})
            assert answer.structured_content["state"] == "running"
            assert (await client.call_tool("cancel_job", {"job_id": job_id})).structured_content["state"] == "cancelled"
