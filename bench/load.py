"""Many client sessions pushing jobs through a gateway at once: the load the throughput and memory measures share."""

from __future__ import annotations

import anyio
from mcp import Client

from bench import tools
from bench.circuits import circuit


class JobCounter:
    """Hands out distinct circuit indices (no job repeats another) and counts the calls made."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.next_index = 0
        self.calls = 0
        self.jobs = 0

    def source(self) -> str:
        self.next_index += 1
        return circuit(self.next_index, seed=self.seed)


async def _session(client: Client, jobs: int, counter: JobCounter) -> None:
    """One agent's loop: submit a circuit, wait for its counts, again."""
    for _ in range(jobs):
        job_id = await tools.submit(client, counter.source())
        _, waits = await tools.await_job(client, job_id)
        counter.calls += 1 + waits
        counter.jobs += 1


async def run_jobs(clients: list[Client], jobs: int, counter: JobCounter) -> None:
    """Run exactly `jobs` jobs, spread as evenly as possible over the sessions, all at once."""
    share, extra = divmod(jobs, len(clients))
    async with anyio.create_task_group() as tg:
        for i, client in enumerate(clients):
            count = share + (1 if i < extra else 0)
            if count:
                tg.start_soon(_session, client, count, counter)


async def noop_calls(clients: list[Client], calls_each: int) -> None:
    async def session(client: Client) -> None:
        for _ in range(calls_each):
            await tools.ok(client, "noop")

    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(session, client)
