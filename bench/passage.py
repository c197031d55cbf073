"""Resident memory of a server after 100,000 jobs have passed through it, against after 100.

What "passed" means here: the real `qpu-gateway serve --transport http` process, fed by 32
client sessions (bench/load.py) that each submit a different 5-qubit, 100-shot circuit and wait
for its counts, so every job takes the full path through that one process: HTTP, the MCP
session, the middleware's key check and audit, admission, the queue, the worker, Aer, the
settle, and the wait. Memory is read from /proc (VmRSS) once the jobs of a checkpoint have all
finished and the server has been idle for a second: the median of five readings 0.2 s apart.
The ratio compares two checkpoints of the same process, so a leak shows as growth per job.

Bounded time, honestly: on this path the gateway finishes some 55-60 jobs/s here, so 100,000
jobs take about half an hour. By default the full suite runs 8,000 (about 2.5 minutes), reads memory
at six checkpoints, fits a line to the checkpoints of the second half of the run (past
start-up's one-off growth: imports, Aer, caches filling), and reports the memory at 100,000 on
that line, marked "extrapolated" in the table. Growth that is slowing down (a bounded cache
still filling, SQLite's page cache, the allocator's arenas) makes that estimate too high, never
too low; a steady leak is exactly what a line extrapolates. A negative slope is noise and counts
as zero. `--passage-jobs 100000` runs the real thing and extrapolates nothing; a `--quick` run
reports its few hundred jobs as they are, without extrapolating.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AsyncExitStack

import anyio

from bench import env, load, policies
from bench.context import Context
from bench.model import Row, Target
from bench.raw import rss_mb
from bench.stats import Summary

NAMES = ("passage_rss",)
FIRST = 100
GOAL = 100_000
SESSIONS = 32
READINGS = 5


def checkpoints(total: int) -> list[int]:
    """FIRST, then five even steps up to `total`."""
    steps = [round(total * k / 5) for k in range(1, 6)]
    return [FIRST, *[s for s in steps if s > FIRST]]


async def _readings(pid: int) -> list[float]:
    await anyio.sleep(1.0)
    values = []
    for _ in range(READINGS):
        values.append(rss_mb(pid))
        await anyio.sleep(0.2)
    return values


def slope_per_job(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of MB against jobs."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


async def run(ctx: Context, names: set[str]) -> list[Row]:
    total = ctx.passage_jobs or ctx.pick(8_000, 600)
    marks = checkpoints(total)
    files = await env.gateway_files(ctx.scratch("passage"), policies.admitting())
    port = env.free_port()
    trajectory: list[tuple[int, list[float]]] = []
    began = time.monotonic()
    with env.http_server(env.gateway_http_argv(files, port), port) as server:
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(env.http_client(server.url, files.key)) for _ in range(SESSIONS)]
            counter = load.JobCounter(seed=17)
            for mark in marks:
                await load.run_jobs(clients, mark - counter.jobs, counter)
                trajectory.append((mark, await _readings(server.pid)))
                rate, rss = counter.jobs / (time.monotonic() - began), statistics.median(trajectory[-1][1])
                ctx.log(f"passage: {mark:,} jobs, RSS {rss:.1f} MB ({rate:.0f} jobs/s)")
    first = trajectory[0][1]
    last_mark, last = trajectory[-1]
    fit_from = next(mark for mark in marks if mark >= last_mark / 2)  # the second half of the run
    fit = [(mark, statistics.median(values)) for mark, values in trajectory if mark >= fit_from]
    raw_slope = slope_per_job(fit) if len(fit) >= 2 else 0.0
    slope = max(raw_slope, 0.0)
    # A quick run's few hundred jobs say nothing about 100,000: it reports what it measured.
    extrapolated = last_mark < GOAL and not ctx.quick
    ours = [value + slope * (GOAL - last_mark) for value in last] if extrapolated else last
    if last_mark >= GOAL or extrapolated:
        label = f"RSS after {GOAL:,} jobs" + (f" (extrapolated from {last_mark:,})" if extrapolated else "")
    else:
        label = f"RSS after {last_mark:,} jobs (quick: not extrapolated)"
    notes = [f"Streamable HTTP, {SESSIONS} sessions, submit + wait per job; {READINGS} readings per checkpoint"]
    if extrapolated:
        measured = statistics.median(last)
        notes.append(f"measured {measured:.1f} MB after {last_mark:,}; line fitted from {fit_from:,} jobs on")
    return [
        Row(
            label,
            "MB",
            Summary.of(first),
            Summary.of(ours),
            Target("<=", 1.2),
            f"the same process after {FIRST} jobs",
            notes=notes,
            extra={
                "trajectory_mb": {str(mark): values for mark, values in trajectory},
                "slope_kb_per_1000_jobs": raw_slope * 1024 * 1000,
                "extrapolated": extrapolated,
                "jobs_per_s": counter.jobs / (time.monotonic() - began),
            },
        )
    ]
