"""Circuit breakers: a backend that keeps failing is left alone, its jobs wait, a probe reopens it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.breaker import Breakers
from qpu_gateway.jobs.runtime import Gateway

from .support import BELL2, eventually, in_memory

pytestmark = pytest.mark.anyio


def test_a_breaker_opens_after_the_threshold_and_probes_after_the_cooldown() -> None:
    breakers = Breakers(threshold=2, cooldown_s=0.2)
    breakers.failure("b")
    assert breakers.state("b") == "closed" and breakers.blocked() == []
    breakers.failure("b")
    assert breakers.state("b") == "open" and breakers.blocked() == ["b"]
    time.sleep(0.25)
    assert breakers.state("b") == "half_open" and breakers.blocked() == []
    breakers.started("b")  # the probe
    assert breakers.blocked() == ["b"]  # only one probe at a time
    breakers.failure("b")  # the probe failed: open again, at once
    assert breakers.state("b") == "open"
    time.sleep(0.25)
    breakers.started("b")
    breakers.success("b")
    assert breakers.state("b") == "closed" and breakers.blocked() == []


async def test_jobs_wait_while_a_backend_is_failing_and_run_once_it_recovers(config: Config, alice_key: str) -> None:
    gateway = Gateway(
        Config(
            **{
                **config.__dict__,
                "faults": "transient,transient,transient,transient",
                "breaker_threshold": 2,
                "breaker_cooldown_s": 0.5,
                "retry_max_tries": 5,
            }
        )
    )
    seen: set[str] = set()
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        await client.call_tool("list_backends", {})  # providers list once (slow the first time), then cached
        first = (await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})).structured_content
        second = (await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})).structured_content

        async def both_done() -> bool:
            listing = (await client.call_tool("list_backends", {})).structured_content
            seen.update(b["breaker"] for b in listing["backends"] if b["id"] == "faulty/qpu")
            views: list[dict[str, Any]] = [
                (await client.call_tool("get_job", {"job_id": j["job_id"]})).structured_content for j in (first, second)
            ]
            assert all(v["state"] != "failed" for v in views), views  # waiting, never failed by the outage
            return all(v["state"] == "succeeded" for v in views)

        await eventually(both_done, within_s=30, every=0.1)
        final = (await client.call_tool("list_backends", {})).structured_content
    assert "open" in seen
    assert [b["breaker"] for b in final["backends"] if b["id"] == "faulty/qpu"] == ["closed"]
    assert gateway.providers.adapters["faulty"].executions == 2  # type: ignore[attr-defined]
