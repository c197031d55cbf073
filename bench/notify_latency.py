"""How soon a job finished on one replica reaches a waiter on another: `python -m bench.notify_latency`.

Two `qpu-gateway serve --transport http` processes share one database: the runner runs the jobs
(the fault-injecting `faulty/qpu` backend, whose submits take 0.3 s, so the waiter is waiting
before each job ends); the watcher cannot run them, and an agent waits for each one there with
`wait_for_job`. The figure is the time from the job's `finished_at` (stamped by the runner just
before it commits the result) to the watcher's answer reaching the agent, the same clock on both
sides (one machine). Both processes run with the shipped defaults (safety poll every 0.5 s).

- Baseline: SQLite, where another process's change is found by polling the watched jobs' versions.
- Ours: PostgreSQL (a fresh database on the local server, dropped afterwards), where the commit
  NOTIFYs every replica's listener and the waiter wakes at once.

It prints median and p95 over `--jobs` jobs per backend, and their ratios; it asserts nothing. A
job that had already finished when the wait began (the waiter's first progress report is already
terminal) is left out of the figures and counted.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import anyio
import psycopg

from bench.env import free_port, http_client, http_server, ours_python
from bench.stats import percentile
from qpu_gateway.config import Database
from qpu_gateway.keys import SCOPES, create_key
from qpu_gateway.store import open_store

PG_SERVER = os.environ.get("QPU_BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_STORAGE = os.environ.get("QPU_BENCH_REDIS_STORAGE", "async+redis://127.0.0.1:6379/0")
POLICY = """
[defaults]
allowed_backends = ["faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }

[prices."faulty/*"]
model = "free"
"""
SLOW_SUBMIT = "mix:slow=1,slow_s=0.3"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.notify_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=50, help="jobs per backend (default 50)")
    return parser.parse_args(argv)


@asynccontextmanager
async def database(backend: str, folder: Path) -> AsyncIterator[Database]:
    if backend == "sqlite":
        yield Database(path=folder / "gateway.db")
        return
    name = f"qpg_bench_{secrets.token_hex(6)}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield Database(url=f"{PG_SERVER}/{name}")
    finally:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def finished_at(db: Database, job_id: str) -> float:
    """The job's finished_at as the runner stored it (seconds since the epoch)."""
    if db.url is not None:
        with psycopg.connect(db.url, autocommit=True) as conn:
            row = conn.execute("SELECT finished_at FROM jobs WHERE id = %s", (job_id,)).fetchone()
    else:
        assert db.path is not None
        with closing(sqlite3.connect(db.path)) as conn:
            row = conn.execute("SELECT finished_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert row is not None and row[0] is not None, job_id
    return float(row[0])


def serve_argv(db: Database, policy: Path, port: int) -> list[str]:
    location = db.url if db.url is not None else str(db.path)
    serve = ["serve", "--transport", "http", "--port", str(port), "--db", location, "--policy", str(policy)]
    return [*ours_python("qpu_gateway"), *serve, "--log-level", "warning"]


async def measure(backend: str, jobs: int, folder: Path) -> tuple[list[float], int]:
    """Latencies (s) of `jobs` jobs finished on the runner and waited for on the watcher; and how many
    were left out because they had finished before the wait began."""
    policy = folder / "policy.toml"
    await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
    await anyio.Path(policy).write_text(POLICY, encoding="utf-8")
    async with database(backend, folder) as db:
        store = await open_store(db)
        try:
            _, key = await create_key(store, agent="bench-agent", project="default", scopes=frozenset(SCOPES))
        finally:
            await store.close()
        shared = {"QPU_GATEWAY_RATE_STORAGE": REDIS_STORAGE} if db.is_postgres else {}
        shared["QPU_GATEWAY_FAULTS"] = ""
        runner_env = {**shared, "QPU_GATEWAY_FAULTS": SLOW_SUBMIT}
        runner_port, watcher_port = free_port(), free_port()
        with (
            http_server(serve_argv(db, policy, runner_port), runner_port, runner_env) as runner,
            http_server(serve_argv(db, policy, watcher_port), watcher_port, shared) as watcher,
        ):
            async with http_client(runner.url, key) as submitter, http_client(watcher.url, key) as waiter:
                samples: list[float] = []
                late = 0
                for n in range(jobs + 1):  # the first job warms the runner up (Qiskit's import): not counted
                    submitted = await submitter.call_tool(
                        "submit_job", {"circuit": _circuit(n), "shots": 10, "backend": "faulty/qpu"}
                    )
                    job_id = (submitted.structured_content or {})["job_id"]
                    first: list[str] = []
                    done = await waiter.call_tool(
                        "wait_for_job",
                        {"job_id": job_id, "timeout_s": 120},
                        progress_callback=_first_progress(first),
                    )
                    answered = time.time()
                    assert (done.structured_content or {}).get("state") == "succeeded", done.content
                    if n == 0:
                        continue
                    if first and first[0].endswith("succeeded"):
                        late += 1
                        continue
                    samples.append(answered - await anyio.to_thread.run_sync(finished_at, db, job_id))
    return samples, late


def _circuit(n: int) -> str:
    angle = (n % 997 + 1) / 1000
    return f'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1];\ncreg c[1];\nrx({angle:.4f}) q[0];\nmeasure q -> c;\n'


def _first_progress(into: list[str]) -> Callable[[float, float | None, str | None], Any]:
    async def progress(progress: float, total: float | None, message: str | None) -> None:
        into.append(message or "")

    return progress


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="qpu-bench-notify-") as scratch:
        figures = {}
        for backend in ("sqlite", "postgresql"):
            figures[backend] = await measure(backend, args.jobs, Path(scratch) / backend)
    print(f"A job finished on one replica, seen by wait_for_job on another: {args.jobs} jobs per backend")
    print(f"{'database (how the watcher learns)':<42} {'median ms':>10} {'p95 ms':>8} {'max ms':>8} {'left out':>9}")
    label = {"sqlite": "SQLite (baseline: polls every 0.5 s)", "postgresql": "PostgreSQL (LISTEN/NOTIFY)"}
    for backend, (samples, late) in figures.items():
        median, p95 = percentile(samples, 50) * 1000, percentile(samples, 95) * 1000
        print(f"{label[backend]:<42} {median:>10.1f} {p95:>8.1f} {max(samples) * 1000:>8.1f} {late:>9}")
    (base, _), (ours, _) = figures["sqlite"], figures["postgresql"]
    print(
        f"PostgreSQL / SQLite: median {percentile(ours, 50) / percentile(base, 50):.2f}x, "
        f"p95 {percentile(ours, 95) / percentile(base, 95):.2f}x (target: p95 under 100 ms)"
    )


if __name__ == "__main__":
    anyio.run(main, parse_args())
