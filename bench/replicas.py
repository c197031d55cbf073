"""Jobs/s over Streamable HTTP on PostgreSQL, 1 and 3 replicas, against SQLite in one process (issue 13).

Baseline: one `qpu-gateway serve --transport http` process on a SQLite file, the embedded default.
Ours: the same command on a fresh PostgreSQL database of its own (the local server, 127.0.0.1:5432),
rate limits in the local Redis as a PostgreSQL gateway requires, as 1 process, and as 3 processes
sharing another fresh database. Every process runs its own workers, so with 3 replicas the jobs
are claimed by whichever replica's worker gets there first (`FOR UPDATE SKIP LOCKED`).

Load: the same number of client sessions for all three, opened before the clock starts, each
submitting the demo's Bell pair (1,000 shots) on Aer and waiting for its counts with wait_for_job,
again and again; with 3 replicas the sessions are dealt round-robin across them (no load balancer:
HAProxy's recipe is tested in tests/test_load_balancer.py; here it would only add its own hop).
Jobs/s is jobs finished over wall time from the first submit to the last count. Each configuration
runs a warm-up pass first (Aer loaded in every process); then repetitions alternate SQLite,
PostgreSQL x1, PostgreSQL x3, so a slow moment of the shared machine falls on all three.

All processes run on this one machine: the 3 replicas share its cores with each other, with
PostgreSQL and Redis, and with the bench's own clients, so the 3-replica figure says what
coordination through PostgreSQL costs, not what 3 machines would give.
"""

from __future__ import annotations

import os
import time
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass

import anyio
from mcp import Client

from bench import env, policies, tools
from bench.circuits import BELL
from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary

NAMES = ("replicas",)
SESSIONS = 24
SHOTS = 1000
REPLICAS = 3


@dataclass
class Setup:
    """One configuration under test: its servers and a client session per load slot."""

    label: str
    clients: list[Client]
    rates: list[float]


async def _bell_jobs(client: Client, jobs: int) -> None:
    for _ in range(jobs):
        submitted = await tools.ok(client, "submit_job", {"circuit": BELL, "shots": SHOTS, "backend": "aer/simulator"})
        job, _ = await tools.await_job(client, str(submitted["job_id"]))
        if not (job.get("result") or {}).get("counts"):
            raise tools.UnexpectedAnswer(f"job {submitted['job_id']} ended without counts")


async def _jobs_per_s(clients: list[Client], jobs_each: int) -> float:
    began = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(_bell_jobs, client, jobs_each)
    return len(clients) * jobs_each / (time.perf_counter() - began)


async def run(ctx: Context, names: set[str]) -> list[Row]:
    sessions, jobs_each, repeats = ctx.pick(SESSIONS, 6), ctx.pick(6, 2), ctx.pick(3, 1)
    text = policies.counting()  # the default policy, rate limits and loop guard out of a benchmark's way
    with ExitStack() as servers:
        sqlite = await env.gateway_files(ctx.scratch("replicas-sqlite"), text)
        one_url = servers.enter_context(env.postgres_database())
        three_url = servers.enter_context(env.postgres_database())
        one = await env.gateway_files(ctx.scratch("replicas-pg1"), text, url=one_url)
        three = await env.gateway_files(ctx.scratch("replicas-pg3"), text, url=three_url)
        urls: dict[str, list[str]] = {}
        for label, files, count in (("sqlite", sqlite, 1), ("pg1", one, 1), ("pg3", three, REPLICAS)):
            urls[label] = []
            for _ in range(count):
                port = env.free_port()
                server = servers.enter_context(
                    env.http_server(env.gateway_http_argv(files, port), port, files.server_env())
                )
                urls[label].append(server.url)
        keys = {"sqlite": sqlite.key, "pg1": one.key, "pg3": three.key}
        async with AsyncExitStack() as stack:
            setups = []
            for label in ("sqlite", "pg1", "pg3"):
                clients = [
                    await stack.enter_async_context(env.http_client(urls[label][i % len(urls[label])], keys[label]))
                    for i in range(sessions)
                ]
                setups.append(Setup(label, clients, []))
            for setup in setups:
                await _jobs_per_s(setup.clients, 1)  # warm-up: Aer loaded in every process
            for i in range(repeats):
                for setup in setups:
                    setup.rates.append(await _jobs_per_s(setup.clients, jobs_each))
                ctx.log(
                    f"replicas {i + 1}/{repeats}: " + ", ".join(f"{s.label} {s.rates[-1]:.1f} jobs/s" for s in setups)
                )
    base, pg1, pg3 = setups
    cores = os.cpu_count() or 1
    notes = [
        f"{sessions} client sessions × {jobs_each} Bell jobs ({SHOTS} shots, aer/simulator) per repetition, "
        f"{repeats} repetitions alternating SQLite / PostgreSQL ×1 / ×{REPLICAS}",
        f"one machine, {cores} cores: every server process, PostgreSQL, Redis and the bench's clients share them",
    ]
    return [
        Row(
            "jobs/s over HTTP, PostgreSQL, 1 replica",
            "jobs/s",
            Summary.of(base.rates),
            Summary.of(pg1.rates),
            Target(">=", 0.5),
            "SQLite, one process",
            notes=notes,
        ),
        Row(
            f"jobs/s over HTTP, PostgreSQL, {REPLICAS} replicas",
            "jobs/s",
            Summary.of(base.rates),
            Summary.of(pg3.rates),
            Target(">=", 0.5),
            "SQLite, one process",
            notes=[*notes, f"sessions dealt round-robin across the {REPLICAS} replicas, {cores} cores shared by all"],
        ),
    ]
