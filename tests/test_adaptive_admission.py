"""Adaptive admission: new jobs to a failing backend are admitted slowly, and the refusal says why."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client

from qpu_gateway.config import Config
from qpu_gateway.jobs.error_rate import MAX_CALLS, ErrorRates, Recent
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.policy.adaptive import Health, check_pace, pace_for
from qpu_gateway.policy.file import AdaptiveAdmission, PolicyFileError, parse_policy

from .conftest import TEST_POLICY
from .support import BELL2, body, eventually, in_memory

pytestmark = pytest.mark.anyio

SETTINGS = AdaptiveAdmission()  # the defaults: 60 s window, 50% over 10 calls, 2 s / 10 s / 30 s


def health(breaker: str = "closed", *, calls: int = 0, failures: int = 0, in_row: int = 0) -> Health:
    return Health("ibm/fake_x", breaker, in_row, calls, failures, 60.0)  # type: ignore[arg-type]


# -- the decision -------------------------------------------------------------------------------


def test_a_healthy_backend_is_never_paced() -> None:
    assert pace_for(SETTINGS, health()) is None  # no calls yet
    assert pace_for(SETTINGS, health(calls=9, failures=9)) is None  # too few calls to judge a rate
    assert pace_for(SETTINGS, health(calls=100, failures=49)) is None  # under the threshold
    assert check_pace(None, last_admitted_at=100.0, now=100.0) is None


def test_a_half_open_backend_admits_one_new_job_per_interval_and_says_why() -> None:
    pace = pace_for(SETTINGS, health("half_open", in_row=5))
    assert pace is not None and pace.interval_s == 10
    assert check_pace(pace, last_admitted_at=None, now=100.0) is None  # the first one goes
    refusal = check_pace(pace, last_admitted_at=100.0, now=103.0)
    assert refusal is not None
    assert (refusal.code, refusal.rule, refusal.retry_after_s) == ("rate_limited", "adaptive_admission", 7.0)
    assert refusal.message == (
        "ibm/fake_x is recovering from provider errors (breaker half-open after 5 failures in a row): the "
        "gateway admits 1 new job to it every 10 s; retry in 7 s, or use another backend (list_backends)."
    )
    assert check_pace(pace, last_admitted_at=100.0, now=110.0) is None  # its interval has passed


def test_an_open_backend_still_queues_new_jobs_but_more_slowly_than_a_half_open_one() -> None:
    pace = pace_for(SETTINGS, health("open", in_row=5))
    assert pace is not None and pace.interval_s == 30
    refusal = check_pace(pace, last_admitted_at=0.0, now=1.0)
    assert refusal is not None and refusal.retry_after_s == 29.0
    assert "breaker opened after 5 provider errors in a row" in refusal.message
    assert "wait until it recovers" in refusal.message and "retry in 29 s" in refusal.message


def test_a_high_error_rate_slows_admission_in_proportion_to_the_rate() -> None:
    at_threshold = pace_for(SETTINGS, health(calls=10, failures=5))
    all_failing = pace_for(SETTINGS, health(calls=20, failures=20))
    assert at_threshold is not None and at_threshold.interval_s == 2
    assert all_failing is not None and all_failing.interval_s == 4
    refusal = check_pace(all_failing, last_admitted_at=0.0, now=1.5)
    assert refusal is not None and refusal.retry_after_s == 2.5
    assert refusal.message.startswith(
        "ibm/fake_x failed 20 of its last 20 provider calls (100% in the last 60 s, at or above the 50% "
        "the policy tolerates): the gateway admits 1 new job to it every 4 s; retry in 3 s"
    )


def test_the_breaker_state_comes_before_the_error_rate_and_disabled_paces_nothing() -> None:
    pace = pace_for(SETTINGS, health("half_open", calls=20, failures=20, in_row=5))
    assert pace is not None and pace.interval_s == 10
    off = AdaptiveAdmission(enabled=False)
    assert pace_for(off, health("open", calls=20, failures=20, in_row=5)) is None


def test_the_policy_file_sets_adaptive_admission_for_every_agent_and_refuses_bad_values() -> None:
    policy = parse_policy('[adaptive_admission]\nwindow = "2m"\nmin_calls = 3\nhalf_open_interval = "1s"\n')
    assert policy.adaptive_admission == AdaptiveAdmission(window=120, min_calls=3, half_open_interval=1)
    assert parse_policy("").adaptive_admission == AdaptiveAdmission()  # on by default
    with pytest.raises(PolicyFileError, match=r"line 2: adaptive_admission.error_rate_threshold"):
        parse_policy("[adaptive_admission]\nerror_rate_threshold = 1.5\n")


# -- the error rate -------------------------------------------------------------------------------


def test_the_error_rate_counts_the_calls_of_the_sliding_window_only() -> None:
    rates = ErrorRates(window_s=10)
    for at in range(5):
        rates.record("b", failed=True, now=float(at))
    rates.record("b", failed=False, now=5.0)
    assert rates.recent("b", now=6.0) == Recent(calls=6, failures=5)
    later = rates.recent("b", now=12.5)  # the failures at 0, 1 and 2 have left the window
    assert (later.calls, later.failures) == (3, 2)
    assert rates.recent("b", now=100.0).calls == 0 and rates.recent("other", now=0.0).calls == 0


def test_the_error_rate_remembers_a_bounded_number_of_calls() -> None:
    rates = ErrorRates(window_s=1e9)
    for n in range(MAX_CALLS + 500):
        rates.record("b", failed=n < 500, now=float(n))
    recent = rates.recent("b", now=float(MAX_CALLS + 500))
    assert (recent.calls, recent.failures) == (MAX_CALLS, 0)  # the oldest (the failures) were dropped


# -- end to end, over a real MCP client session ------------------------------------------------------


def paced_config(config: Config, adaptive: str, **overrides: Any) -> Config:
    config.policy_path.write_text(TEST_POLICY + f"\n[adaptive_admission]\n{adaptive}\n", encoding="utf-8")
    return Config(**{**config.__dict__, **overrides})


async def submit(client: Client, **extra: Any) -> dict[str, Any]:
    return body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu", **extra}))


async def breaker_of(client: Client) -> str:
    listing = body(await client.call_tool("list_backends", {}))
    return str(next(b["breaker"] for b in listing["backends"] if b["id"] == "faulty/qpu"))


async def test_a_failing_backend_is_paced_while_open_and_half_open_then_admits_at_full_speed(
    config: Config, alice_key: str
) -> None:
    # Two transient failures open the breaker; after 1 s the job's retry is the probe, whose submit
    # takes 2.5 s (half-open all that while) and succeeds.
    gateway = Gateway(
        paced_config(
            config,
            "enabled = true",
            faults="transient,transient,slow:2.5",
            breaker_threshold=2,
            breaker_cooldown_s=1.0,
        )
    )
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        await client.call_tool("list_backends", {})  # providers list once (slow the first time), then cached
        first = await submit(client)
        assert first["state"] == "queued"

        async def breaker_is(state: str) -> bool:
            return await breaker_of(client) == state

        await eventually(lambda: breaker_is("open"), every=0.02)
        refused_open = await submit(client)
        await eventually(lambda: breaker_is("half_open"), every=0.02)
        refused_half_open = await submit(client)
        dry_run = await submit(client, dry_run=True)  # runs on Aer: never paced
        estimate = body(await client.call_tool("estimate_job", {"circuit": BELL2, "backend": "faulty/qpu"}))

        async def first_done() -> bool:
            view = body(await client.call_tool("get_job", {"job_id": first["job_id"]}))
            return bool(view["state"] == "succeeded") and await breaker_of(client) == "closed"

        await eventually(first_done)
        burst = [await submit(client) for _ in range(3)]
        audit = await gateway.store.audit_tail(limit=10_000, agent="alice")

    assert refused_open["code"] == "rate_limited"
    assert refused_open["message"].startswith(
        "faulty/qpu is failing (its breaker opened after 2 provider errors in a row; jobs queued for it "
        "wait until it recovers): the gateway admits 1 new job to it every 30 s; retry in "
    )
    assert 0 < refused_open["retry_after_s"] <= 30
    assert refused_half_open["code"] == "rate_limited"
    assert refused_half_open["message"].startswith(
        "faulty/qpu is recovering from provider errors (breaker half-open after 2 failures in a row): "
        "the gateway admits 1 new job to it every 10 s; retry in "
    )
    assert refused_half_open["message"].endswith("or use another backend (list_backends).")
    assert 0 < refused_half_open["retry_after_s"] <= 10
    assert dry_run["state"] == "queued" and estimate["admitted"] is True
    assert [job["state"] for job in burst] == ["queued"] * 3  # recovered: no pacing at all
    refusals = [(r.decision, r.error_code) for r in audit if r.tool == "submit_job" and r.error_code]
    assert refusals == [("refused", "rate_limited")] * 2


async def test_a_high_error_rate_paces_a_backend_whose_breaker_never_opens(config: Config, alice_key: str) -> None:
    gateway = Gateway(
        paced_config(
            config,
            'window = "4s"\nmin_calls = 4\nerror_rate_interval = "5s"',
            faults="transient,transient,transient,transient",
            breaker_threshold=100,
            retry_max_tries=2,
        )
    )
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        await client.call_tool("list_backends", {})
        jobs = [await submit(client), await submit(client)]  # healthy so far: both admitted at once

        async def both_failed() -> bool:
            views = [body(await client.call_tool("get_job", {"job_id": j["job_id"]})) for j in jobs]
            return all(v["state"] == "failed" for v in views)

        await eventually(both_failed)
        refused = await submit(client)
        assert await breaker_of(client) == "closed"

        admitted: list[dict[str, Any]] = []

        async def admitted_once_the_failures_leave_the_window() -> bool:
            answer = await submit(client)
            if answer.get("state") != "queued":
                assert answer["code"] == "rate_limited", answer
                return False
            admitted.append(answer)
            return True

        await eventually(admitted_once_the_failures_leave_the_window, within_s=30, every=0.25)
        burst = [await submit(client) for _ in range(3)]

    assert refused["code"] == "rate_limited"
    assert refused["message"].startswith(
        "faulty/qpu failed 4 of its last 4 provider calls (100% in the last 4 s, at or above the 50% the "
        "policy tolerates): the gateway admits 1 new job to it every 10 s; retry in "
    )
    assert 0 < refused["retry_after_s"] <= 10
    assert [job["state"] for job in burst] == ["queued"] * 3


async def test_concurrent_submits_to_a_paced_backend_admit_exactly_one(config: Config, alice_key: str) -> None:
    gateway = Gateway(paced_config(config, "enabled = true", faults="ok", breaker_threshold=2))
    answers: list[dict[str, Any]] = []
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        await client.call_tool("list_backends", {})
        for _ in range(2):  # as two failed calls would: the breaker is open for its 30 s cooldown
            gateway.workers.breakers.failure("faulty/qpu")

        async def one() -> None:
            answers.append(await submit(client))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
        audit = await gateway.store.audit_tail(limit=10_000, agent="alice")

    queued = [a for a in answers if a.get("state") == "queued"]
    refused = [a for a in answers if a.get("code") == "rate_limited"]
    assert (len(queued), len(refused)) == (1, 7), answers
    assert all("breaker opened" in a["message"] and 0 < a["retry_after_s"] <= 30 for a in refused)
    assert sum(1 for r in audit if r.tool == "submit_job" and r.error_code == "rate_limited") == 7
