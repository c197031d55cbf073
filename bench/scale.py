"""get_job and list_jobs with 100,000 jobs in the database, against the same with 100.

Two databases, seeded alike (bench/seed.py says how and why that is honest): one holds 100
finished jobs of the bench agent, the other 100,000. A server of ours runs on each (the real
`qpu-gateway serve`, workers and all: with 100,000 rows, their background polling is part of
what a call meets). Rounds alternate between the two servers. get_job reads a job picked at
random from the whole database each time (most are cold); list_jobs asks for the default first
page (20, newest first).
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from mcp import Client

from bench import env, policies, seed, tools
from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary

NAMES = ("scale_get_job", "scale_list_jobs")
SMALL = 100


async def _seeded(ctx: Context, name: str, jobs: int) -> tuple[env.GatewayFiles, list[str]]:
    files = await env.gateway_files(ctx.scratch(name), policies.admitting())
    key_id = files.key.split("_")[1]
    seconds = seed.seed(files.db, jobs, agent=env.AGENT, key_id=key_id)
    ctx.log(f"seeded {jobs:,} jobs in {seconds:.1f} s ({files.db.stat().st_size / 2**20:.0f} MB)")
    return files, _job_ids(files.db)


def _job_ids(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM jobs")]


async def _block(client: Client, ids: list[str], rng: random.Random, count: int, out: dict[str, list[float]]) -> None:
    for _ in range(count):
        job_id = rng.choice(ids)
        out["get_job"].append(await tools.timed_ms(lambda: tools.ok(client, "get_job", {"job_id": job_id})))  # noqa: B023
    for _ in range(count):
        out["list_jobs"].append(await tools.timed_ms(lambda: tools.ok(client, "list_jobs")))


async def run(ctx: Context, names: set[str]) -> list[Row]:
    large = ctx.pick(100_000, 5_000)
    small_files, small_ids = await _seeded(ctx, "scale-small", SMALL)
    large_files, large_ids = await _seeded(ctx, "scale-large", large)
    rounds, per_round = ctx.pick(6, 2), ctx.pick(40, 10)
    rng = random.Random(6)
    small: dict[str, list[float]] = {"get_job": [], "list_jobs": []}
    big: dict[str, list[float]] = {"get_job": [], "list_jobs": []}
    async with (
        env.stdio_client(env.gateway_params(small_files)) as small_client,
        env.stdio_client(env.gateway_params(large_files)) as large_client,
    ):
        await _block(small_client, small_ids, rng, 5, {"get_job": [], "list_jobs": []})  # warm-up
        await _block(large_client, large_ids, rng, 5, {"get_job": [], "list_jobs": []})
        for r in range(rounds):
            sides = [(small_client, small_ids, small), (large_client, large_ids, big)]
            for client, ids, out in sides if r % 2 == 0 else reversed(sides):
                await _block(client, ids, rng, per_round, out)
            ctx.log(
                f"scale round {r + 1}/{rounds}: get_job {Summary.of(small['get_job']).median:.2f} → "
                f"{Summary.of(big['get_job']).median:.2f} ms, list_jobs {Summary.of(small['list_jobs']).median:.2f} → "
                f"{Summary.of(big['list_jobs']).median:.2f} ms"
            )
    rows = []
    for tool in ("get_job", "list_jobs"):
        if f"scale_{tool}" not in names:
            continue
        rows.append(
            Row(
                f"{tool} p50 with {large:,} jobs in the db",
                "ms",
                Summary.of(small[tool], latency=True),
                Summary.of(big[tool], latency=True),
                Target("<=", 1.2),
                f"the same with {SMALL} jobs",
                notes=["random job id each call" if tool == "get_job" else "default first page (20, newest first)"],
            )
        )
    return rows
