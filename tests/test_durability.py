"""Jobs survive server restarts and crashes, and several processes on one database never run a job twice.

On PostgreSQL too: the crash (SIGKILL) restart and two processes sharing 200 jobs. The graceful
restart's hand-back and the queued job kept for the next start are store calls that
tests/test_store.py runs on both backends; they run here on SQLite only, to keep the suite short.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import anyio
import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.store import open_store

from .databases import BACKENDS
from .support import BELL2, http_client, start_http_server

pytestmark = pytest.mark.anyio


async def job_state(config: Config, job_id: str) -> Any:
    store = await open_store(config.database)
    try:
        return await store.get_job(job_id)
    finally:
        await store.close()


async def wait_for_state(config: Config, job_id: str, states: set[JobState]) -> Any:
    with anyio.fail_after(30):
        while True:
            job = await job_state(config, job_id)
            if job.state in states:
                return job
            await anyio.sleep(0.1)


@pytest.mark.parametrize(("stop", "db_backend"), [("graceful", "sqlite"), ("crash", "sqlite"), ("crash", "postgresql")])
async def test_a_job_in_flight_survives_a_server_restart(config: Config, alice_key: str, stop: str) -> None:
    first = start_http_server(config, QPU_GATEWAY_FAULTS="slow:60")
    try:
        async with http_client(first.url, alice_key) as client:
            submitted = await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})
        job_id = submitted.structured_content["job_id"]
        await wait_for_state(config, job_id, {JobState.SUBMITTING})
        if stop == "graceful":
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=20) == 0
            handed_back = await job_state(config, job_id)
            assert handed_back.state is JobState.QUEUED and handed_back.lease_owner is None
            store = await open_store(config.database)
            try:
                trail = [r.tool for r in await store.audit_tail(limit=100, job_id=job_id)]
            finally:
                await store.close()
            assert trail[-1] == "job.handed_back"
        else:
            first.process.send_signal(signal.SIGKILL)
            first.process.wait(timeout=20)
            crashed = await job_state(config, job_id)
            assert crashed.state is JobState.SUBMITTING and crashed.lease_owner is not None
    finally:
        first.stop()

    second = start_http_server(config, QPU_GATEWAY_FAULTS="ok")
    try:
        async with http_client(second.url, alice_key) as client:
            done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60})
    finally:
        second.stop()
    assert done.structured_content["state"] == "succeeded"
    finished = await job_state(config, job_id)
    assert finished.runs == 2  # claimed by the first process, then once by the second


async def test_a_queued_job_waits_for_the_next_server_start(config: Config, alice_key: str) -> None:
    busy = start_http_server(config, QPU_GATEWAY_FAULTS="slow:60,slow:60,slow:60")
    try:
        async with http_client(busy.url, alice_key) as client:
            ids = [
                (await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"})).structured_content[
                    "job_id"
                ]
                for _ in range(3)
            ]
        # two run at once per backend; the third is still queued when the server stops
        await wait_for_state(config, ids[1], {JobState.SUBMITTING})
        assert (await job_state(config, ids[2])).state is JobState.QUEUED
        busy.process.send_signal(signal.SIGTERM)
        busy.process.wait(timeout=20)
    finally:
        busy.stop()
    assert {(await job_state(config, i)).state for i in ids} == {JobState.QUEUED}

    fresh = start_http_server(config, QPU_GATEWAY_FAULTS="ok")
    try:
        for job_id in ids:
            assert (await wait_for_state(config, job_id, set(TERMINAL))).state is JobState.SUCCEEDED
    finally:
        fresh.stop()


@pytest.mark.slow
@pytest.mark.parametrize("db_backend", BACKENDS)
async def test_two_server_processes_share_200_jobs_and_run_none_twice(config: Config, alice_key: str) -> None:
    servers = [start_http_server(config), start_http_server(config)]
    job_ids: list[str] = []
    try:

        async def submit_many(url: str, count: int) -> None:
            async with http_client(url, alice_key) as client:
                for i in range(count):
                    result = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 20, "name": f"n{i}"})
                    assert not result.is_error, result.content
                    job_ids.append(result.structured_content["job_id"])

        async with anyio.create_task_group() as tg:
            for server in servers:
                for _ in range(2):
                    tg.start_soon(submit_many, server.url, 50)
        deadline = time.monotonic() + 180
        store = await open_store(config.database)
        try:
            while time.monotonic() < deadline:
                jobs = [await store.get_job(j) for j in job_ids]
                if all(j is not None and j.state in TERMINAL for j in jobs):
                    break
                await anyio.sleep(0.5)
            claims = [r for r in await store.audit_tail(limit=100_000) if r.tool == "job.claimed"]
        finally:
            await store.close()
    finally:
        for server in servers:
            server.stop()
    assert len(job_ids) == len(set(job_ids)) == 200
    assert Counter(j.state for j in jobs if j is not None) == {JobState.SUCCEEDED: 200}
    assert all(j is not None and j.runs == 1 for j in jobs)
    per_job = Counter(r.job_id for r in claims)
    assert set(per_job.values()) == {1} and len(per_job) == 200
    workers = Counter((r.detail or "").split(",")[0] for r in claims)
    assert len(workers) == 2  # both processes took a share
