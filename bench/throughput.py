"""End-to-end jobs/s over Streamable HTTP: 32 client sessions against one server process.

Ours: `qpu-gateway serve --transport http` (one process, its own workers running the jobs on
Aer); every session submits a different 5-qubit, 100-shot circuit and waits for it with
wait_for_job, again and again. Jobs/s is jobs finished over wall time, from the first submit to
the last result, with every session busy throughout.

Baseline: the bare MCPServer over Streamable HTTP, the same 32 sessions in the same process,
each making as many no-op calls per job as ours made (submit + wait: 2, more if a wait timed
out); its calls/s divided by calls per job is the job rate the transport alone allows.

Beside the ratio, the same sessions' no-op calls against our own server (the bench's runner of
it with a no-op tool, its own database) give the gateway's per-call floor over HTTP (key check,
audit row, middleware) in the same units: the ratio this measure could reach if a job's own work
cost nothing. It is reported in the notes; the target is against the bare server.

Sessions are opened before the clock starts (a session is set up once per agent, not per job),
and both sides get a warm-up pass first (it loads Aer in our server, and warms both servers'
code paths). Baseline and ours alternate, repetition by repetition.
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

from bench import env, load, policies
from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary

NAMES = ("throughput",)
SESSIONS = 32


async def run(ctx: Context, names: set[str]) -> list[Row]:
    files = await env.gateway_files(ctx.scratch("throughput"), policies.admitting())
    sessions = ctx.pick(SESSIONS, 8)
    jobs_each, repeats = ctx.pick(8, 2), ctx.pick(3, 2)
    floor_files = await env.gateway_files(ctx.scratch("throughput-floor"), policies.admitting())
    ours_port, bare_port, floor_port = env.free_port(), env.free_port(), env.free_port()
    ours_rates: list[float] = []
    bare_rates: list[float] = []
    floor_rates: list[float] = []
    calls_per_job: list[float] = []
    with (
        env.http_server(env.gateway_http_argv(files, ours_port), ours_port) as ours_server,
        env.http_server(env.bare_http_argv(bare_port), bare_port) as bare_server,
        env.http_server(env.gateway_noop_http_argv(floor_files, floor_port), floor_port) as floor_server,
    ):
        async with AsyncExitStack() as stack:
            ours = [
                await stack.enter_async_context(env.http_client(ours_server.url, files.key)) for _ in range(sessions)
            ]
            bare = [await stack.enter_async_context(env.http_client(bare_server.url, None)) for _ in range(sessions)]
            floor = [
                await stack.enter_async_context(env.http_client(floor_server.url, floor_files.key))
                for _ in range(sessions)
            ]
            counter = load.JobCounter(seed=11)
            await load.run_jobs(ours, sessions, counter)  # warm-up: loads Aer in the server
            await load.noop_calls(bare, 2)
            await load.noop_calls(floor, 2)
            for i in range(repeats):
                counter.calls = 0
                began = time.perf_counter()
                await load.run_jobs(ours, sessions * jobs_each, counter)
                ours_rates.append(sessions * jobs_each / (time.perf_counter() - began))
                per_job = counter.calls / (sessions * jobs_each)
                calls_per_job.append(per_job)
                bare_calls = max(1, round(per_job * jobs_each))
                began = time.perf_counter()
                await load.noop_calls(bare, bare_calls)
                bare_rates.append(sessions * bare_calls / (time.perf_counter() - began) / per_job)
                began = time.perf_counter()
                await load.noop_calls(floor, bare_calls)
                floor_rates.append(sessions * bare_calls / (time.perf_counter() - began) / per_job)
                ctx.log(
                    f"throughput {i + 1}/{repeats}: ours {ours_rates[-1]:.1f} jobs/s, "
                    f"bare {bare_rates[-1]:.1f} jobs/s-equivalent, our no-op {floor_rates[-1]:.1f} "
                    f"({per_job:.2f} calls/job)"
                )
    floor_rate, bare_rate = Summary.of(floor_rates).median, Summary.of(bare_rates).median
    return [
        Row(
            f"end-to-end jobs/s, Streamable HTTP, {sessions} sessions",
            "jobs/s",
            Summary.of(bare_rates),
            Summary.of(ours_rates),
            Target(">=", 0.8),
            "bare MCPServer no-op calls/s ÷ calls per job",
            notes=[
                f"{sessions} sessions × {jobs_each} jobs per repetition, {repeats} repetitions, alternating",
                f"calls per job (submit + wait_for_job): {Summary.of(calls_per_job).median:.2f}",
                f"our server's own no-op calls from the same sessions: {floor_rate:.1f} jobs/s-equivalent, "
                f"{floor_rate / bare_rate:.2f}x the bare server (the ceiling of this ratio)",
            ],
            extra={"calls_per_job": calls_per_job, "our_noop_jobs_per_s": floor_rates},
        )
    ]
