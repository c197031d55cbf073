"""Metrics and a job's timeline: what a scrape of a real gateway shows after real jobs, for one
HTTP process and for an installation of stdio processes only; get_job's and `jobs show`'s history."""

from __future__ import annotations

import json
import subprocess
import time

import anyio
import httpx2
import pytest
from mcp import Client
from prometheus_client.parser import text_string_to_metric_families

from qpu_gateway.config import Config
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.timeline import HEAD, TAIL, job_timeline
from qpu_gateway.store import open_store
from qpu_gateway.store.records import AuditEntry
from qpu_gateway.telemetry import snapshots
from qpu_gateway.telemetry.endpoint import process_exposition
from qpu_gateway.telemetry.metrics import exposition_of

from .databases import BACKENDS
from .support import (
    BELL2,
    body,
    free_port,
    gateway_cmd,
    http_client,
    in_memory,
    location_of,
    start_http_server,
    stdio_params,
    stop_process,
    wait_listening,
)

pytestmark = pytest.mark.anyio

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """Every sample of an exposition, by name and labels (the official parser: the format is valid)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, metric: str, /, **labels: str) -> float:
    """The sum of the samples named `metric` whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in series.items() if n == metric and wanted <= have)


def scrape(port: int, token: str | None = None) -> httpx2.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx2.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)


async def test_a_scrape_of_an_http_gateway_counts_its_calls_jobs_and_refusals(config: Config, alice_key: str) -> None:
    server = start_http_server(config)
    try:
        async with http_client(server.url, alice_key) as client:
            submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100}))
            done = body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
            refused = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "aer/made-up-1"}))
            await client.call_tool("no_such_tool", {})
        assert done["state"] == "succeeded" and refused["code"] == "unsupported_backend"
        answer = await anyio.to_thread.run_sync(scrape, server.port)
    finally:
        server.stop()

    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    series = parse(answer.text)
    calls = "qpu_gateway_calls_total"
    assert value(series, calls, method="tools/call", name="submit_job", code="ok") == 1
    assert value(series, calls, method="tools/call", name="submit_job", code="unsupported_backend") == 1
    assert value(series, calls, method="tools/call", name="wait_for_job", code="ok") == 1
    # A tool or backend the caller made up is `other`: callers cannot grow the label set.
    assert value(series, calls, method="tools/call", name="other", code="not_found") == 1
    assert not any("made-up" in str(labels) or "no_such_tool" in str(labels) for _, labels in series)
    assert value(series, "qpu_gateway_jobs_refused_total", code="unsupported_backend", backend="other") == 1
    assert value(series, "qpu_gateway_call_duration_seconds_count", name="submit_job") == 2
    assert value(series, "qpu_gateway_call_duration_seconds_bucket", name="submit_job", le="300.0") == 2
    admitted = value(series, "qpu_gateway_jobs_admitted_total", agent="alice", backend="aer/simulator", state="queued")
    assert admitted == 1
    assert value(series, "qpu_gateway_jobs_finished_total", backend="aer/simulator", state="succeeded") == 1
    assert value(series, "qpu_gateway_queue_wait_seconds_count", backend="aer/simulator") == 1
    assert value(series, "qpu_gateway_job_run_seconds_count", backend="aer/simulator") == 1
    assert value(series, "qpu_gateway_provider_calls_total", backend="aer/simulator", call="submit") == 1
    assert value(series, "qpu_gateway_breaker_state", backend="aer/simulator", state="closed") == 1
    # The database's gauges: the job ended, so nothing is live or waiting.
    assert value(series, "qpu_gateway_approvals_pending") == 0
    assert value(series, "qpu_gateway_jobs") == 0
    assert ("qpu_gateway_store_errors_total", frozenset({("kind", "busy")})) in series


async def test_metrics_answer_loopback_only_or_the_bearer_of_the_metrics_token(config: Config, alice_key: str) -> None:
    server = start_http_server(config, QPU_GATEWAY_METRICS_TOKEN="scrape-me-7")
    try:
        without = await anyio.to_thread.run_sync(scrape, server.port)
        wrong = await anyio.to_thread.run_sync(scrape, server.port, "scrape-me-8")
        right = await anyio.to_thread.run_sync(scrape, server.port, "scrape-me-7")
        # The agent's own key is not the metrics token.
        agent = await anyio.to_thread.run_sync(scrape, server.port, alice_key)
    finally:
        server.stop()
    assert (without.status_code, wrong.status_code, agent.status_code, right.status_code) == (401, 401, 401, 200)
    assert without.json()["code"] == "forbidden" and "QPU_GATEWAY_METRICS_TOKEN" in without.json()["message"]
    assert "scrape-me" not in without.text + wrong.text
    assert "qpu_gateway_calls_total" in right.text or "qpu_gateway_jobs" in right.text


async def test_an_installation_of_stdio_servers_is_scraped_with_every_process_counted(
    config: Config, alice_key: str, bob_key: str
) -> None:
    for key in (alice_key, bob_key):  # two client sessions, each its own stdio server process
        async with Client(stdio_params(config, key)) as client:
            submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 50}))
            assert body(await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))["state"] == "succeeded"

    def show() -> Series:
        shown = subprocess.run(
            gateway_cmd("metrics", "show", "--db", location_of(config.database), "--policy", str(config.policy_path)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return parse(shown.stdout)

    both = await anyio.to_thread.run_sync(show)
    assert value(both, "qpu_gateway_calls_total", name="submit_job", code="ok") == 2
    assert value(both, "qpu_gateway_jobs_admitted_total", agent="alice") == 1
    assert value(both, "qpu_gateway_jobs_admitted_total", agent="bob") == 1
    assert value(both, "qpu_gateway_jobs_finished_total", state="succeeded") == 2

    # Both processes are gone: their rows are added into the retired row, and the totals stay.
    store = await open_store(config.database)
    try:
        retired = await store.retire_metrics(time.time() + 1, [], snapshots.merge, time.time())
        owners = [row.owner for row in await store.metric_snapshots()]
    finally:
        await store.close()
    assert retired == 2 and owners == [snapshots.RETIRED_METRICS]
    after = await anyio.to_thread.run_sync(show)
    assert value(after, "qpu_gateway_calls_total", name="submit_job", code="ok") == 2
    assert value(after, "qpu_gateway_call_duration_seconds_count", name="submit_job") == 2


async def test_metrics_serve_exposes_the_installation_over_http(config: Config, alice_key: str) -> None:
    async with Client(stdio_params(config, alice_key)) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2}))
        await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]})
    port = free_port()
    command = gateway_cmd("metrics", "serve", "--port", str(port), "--db", location_of(config.database))

    def scrape_exporter() -> tuple[httpx2.Response, httpx2.Response]:
        exporter = subprocess.Popen([*command, "--policy", str(config.policy_path)])
        try:
            wait_listening(exporter, port, what="metrics exporter")
            return scrape(port), httpx2.get(f"http://127.0.0.1:{port}/mcp", timeout=10)
        finally:
            stop_process(exporter)

    answer, other = await anyio.to_thread.run_sync(scrape_exporter)
    assert answer.status_code == 200 and other.status_code == 404
    assert value(parse(answer.text), "qpu_gateway_calls_total", name="submit_job", code="ok") == 1


BUDGET_POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }
confirm_above_usd = "0.50"
operator_above_usd = "0.50"
agent_quota = { cost_usd = { day = "10.00" } }

[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "0"
per_shot_usd = "0.001"
"""


async def test_gauges_show_held_jobs_and_budgets_used_from_the_database(config: Config, alice_key: str) -> None:
    await anyio.Path(config.policy_path).write_text(BUDGET_POLICY, encoding="utf-8")
    gateway = Gateway(Config(**{**config.__dict__, "faults": "ok"}))
    async with gateway.running(workers=False), in_memory(gateway, alice_key) as client:
        held = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu", "shots": 1000}))
        queued = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu", "shots": 100}))
        series = parse((await process_exposition(gateway)()).decode())
    assert held["code"] == "approval_required" and queued["state"] == "queued"
    assert value(series, "qpu_gateway_approvals_pending") == 1
    assert value(series, "qpu_gateway_approvals_oldest_age_seconds") >= 0
    assert value(series, "qpu_gateway_jobs", state="pending_approval", backend="faulty/qpu") == 1
    assert value(series, "qpu_gateway_queue_depth", backend="faulty/qpu") == 1
    # $1.00 held and $0.10 queued are both reserved against alice's $10.00 a day.
    ratio = value(series, "qpu_gateway_budget_used_ratio", scope="agent", name="alice", period="day", dimension="cost")
    assert ratio == pytest.approx(0.11)
    assert value(series, "qpu_gateway_jobs_admitted_total", state="pending_approval") == 1
    assert value(series, "qpu_gateway_jobs_admitted_total", state="queued") == 1
    assert value(series, "qpu_gateway_jobs_refused_total") == 0  # a held job is admitted, not refused


async def test_a_retried_job_shows_each_provider_error_in_its_metrics_and_its_timeline(
    config: Config, alice_key: str
) -> None:
    gateway = Gateway(Config(**{**config.__dict__, "faults": "transient,transient"}))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"}))
        await client.call_tool("wait_for_job", {"job_id": submitted["job_id"]})
        await client.call_tool("get_job", {"job_id": submitted["job_id"]})  # a read: not an event
        view = body(await client.call_tool("get_job", {"job_id": submitted["job_id"], "timeline": True}))
        plain = body(await client.call_tool("get_job", {"job_id": submitted["job_id"]}))
        series = parse(gateway.metrics.exposition().decode())

    errors = "qpu_gateway_provider_errors_total"
    assert (
        value(series, errors, provider="faulty", backend="faulty/qpu", **{"class": "transient"}, code="http_503") == 2
    )
    assert value(series, "qpu_gateway_provider_retries_total", backend="faulty/qpu", call="submit") == 2
    assert value(series, "qpu_gateway_provider_calls_total", backend="faulty/qpu", call="submit") == 3

    assert plain.get("timeline") is None  # only when asked for
    events = view["timeline"]["events"]
    assert [e["event"] for e in events] == ["admitted", "claimed", "retry", "retry", "running", "succeeded"]
    retries = [e["detail"] for e in events if e["event"] == "retry"]
    assert "submit try 1 failed (transient, provider code http_503)" in retries[0] and "try 2 after" in retries[0]
    assert "submit try 2 failed" in retries[1] and "try 3 after" in retries[1]
    assert "charged $0.00" in events[-1]["detail"]
    assert events == sorted(events, key=lambda e: e["at"]) and view["timeline"]["omitted"] == 0

    shown = await anyio.run_process(
        gateway_cmd("jobs", "show", submitted["job_id"], "--db", location_of(config.database))
    )
    assert [e["event"] for e in json.loads(shown.stdout.decode())["timeline"]] == [e["event"] for e in events]


async def test_a_timeline_is_bounded_for_an_agent_and_whole_for_an_operator(config: Config, alice_key: str) -> None:
    gateway = Gateway(config)
    async with gateway.running(workers=False), in_memory(gateway, alice_key) as client:
        job_id = body(await client.call_tool("submit_job", {"circuit": BELL2}))["job_id"]
        for n in range(60):  # a job with a long history (a flaky provider, retried many times)
            entry = AuditEntry(tool="job.retry", decision="event", job_id=job_id, detail=f"retry {n}")
            await gateway.store.append_audit(entry, time.time())
        job = await gateway.store.get_job(job_id)
        assert job is not None
        short = body(await client.call_tool("get_job", {"job_id": job_id, "timeline": True}))["timeline"]
        whole = await job_timeline(gateway.store, job, whole=True)
    assert len(short["events"]) == HEAD + TAIL and short["omitted"] == 61 - HEAD - TAIL
    assert short["events"][0]["event"] == "admitted" and short["events"][-1]["detail"] == "retry 59"
    assert len(whole.events) == 61 and whole.omitted == 0


@pytest.mark.parametrize("db_backend", BACKENDS)
async def test_snapshots_of_gone_processes_are_summed_into_one_row_and_live_ones_kept(config: Config) -> None:
    def counts(n: float) -> str:
        sample = ["qpu_gateway_calls_total", {"code": "ok", "method": "tools/call", "name": "get_job"}, n]
        breaker = ["qpu_gateway_breaker_state", {"backend": "aer/simulator", "state": "open"}, 1.0]
        return json.dumps(
            {
                "qpu_gateway_calls": {"type": "counter", "help": "calls", "samples": [sample]},
                "qpu_gateway_breaker_state": {"type": "gauge", "help": "breakers", "samples": [breaker]},
            }
        )

    store = await open_store(config.database)
    try:
        now = time.time()
        await store.publish_metrics("gone-1", counts(2), now - 600)
        await store.publish_metrics("gone-2", counts(3), now - 600)
        await store.publish_metrics("idle-but-alive", counts(5), now - 600)
        await store.publish_metrics("fresh", counts(7), now)
        merged = await store.retire_metrics(now - 120, ["idle-but-alive"], snapshots.merge, now)
        again = await store.retire_metrics(now - 120, ["idle-but-alive"], snapshots.merge, now)
        rows = await store.metric_snapshots()
    finally:
        await store.close()
    assert (merged, again) == (2, 0)
    assert sorted(row.owner for row in rows) == sorted(["~retired", "idle-but-alive", "fresh"])
    summed = parse(exposition_of(snapshots.families(rows, live=["fresh"])).decode())
    assert value(summed, "qpu_gateway_calls_total", name="get_job") == 2 + 3 + 5 + 7
    # A gone process's breaker says nothing about now: gauges come from live processes only.
    assert value(summed, "qpu_gateway_breaker_state", state="open") == 1
    retired = next(row for row in rows if row.owner == "~retired")
    assert "qpu_gateway_breaker_state" not in json.loads(retired.samples)
