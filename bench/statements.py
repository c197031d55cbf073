"""SQL statements and database round trips per end-to-end job, counted, not timed (issue 13).

An end-to-end job: the SDK's MCP client calls submit_job with the demo's Bell pair (1,000 shots),
the gateway's own worker runs it, and the client reads its counts with wait_for_job. It runs on
each backend that works offline: `aer/simulator` (the default), `braket/local_sv` (the Braket
SDK's LocalSimulator, which takes the cloud-shaped path: submitted, then polled) and
`faulty/qpu` (the fault-injecting adapter with no faults, a provider's hardware stand-in).

The gateway runs in the bench's own process (the real `Gateway` and `build_server`, the client
connected in memory), so the counter sees every connection its store and its rate-limit storage
open. It is installed through the store's one hook (`qpu_gateway.store.observer`) before they
are opened, and reports:

- **statements**: every statement SQLite ran on those connections (`sqlite3`'s trace callback,
  on the aiosqlite connections' threads and the loop-thread connections alike), BEGIN, COMMIT,
  SAVEPOINT and RELEASE included; shown apart as "transaction control";
- **round trips**: every wait on the database, whether a hop to a connection's thread (aiosqlite)
  or a call on the event loop's own thread with no hand-over ("direct").

Each figure is attributed to the store call that made it (`admit`, `get_job`,
`rate_limit.acquire_entry`, ...). The transport adds nothing: the middleware checks the key as
over stdio (over HTTP the token verifier checks it instead, once, and the middleware does not).

Warm-up jobs run first (they load the SDKs, open the rate-limit storage, note the key's last
use, fill the backend cache); then N jobs, one after another, and the figures are per job,
averaged over the N. The gateway's background loops (the worker's claim poll, the change
watcher, the approval sweep) run as in service and are counted too, under their operations:
their share depends on how long the N jobs take, so it is not a property of one job.

The target is issue 13's: at most 20 statements per job (the baseline column holds the budget,
so the ratio is the share of it used).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mcp import Client

from bench import env, policies, tools
from bench.circuits import BELL
from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary
from qpu_gateway.config import Config
from qpu_gateway.store import observer
from qpu_gateway.store.observer import RoundTrip

NAMES = ("statements",)
BUDGET = 20  # statements per job: issue 13's target, on every store
SHOTS = 1000
BACKENDS = ("aer/simulator", "braket/local_sv", "faulty/qpu")
DATABASES = ("sqlite", "postgresql")
_TRANSACTION_CONTROL = frozenset({"BEGIN", "COMMIT", "END", "ROLLBACK", "SAVEPOINT", "RELEASE"})
_NONE = "(outside a store call)"
_LITERAL = re.compile(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b")


def shape(sql: str) -> str:
    """A statement with its values taken out (the trace gives them bound), so repeats group together."""
    text = _LITERAL.sub("?", " ".join(sql.split()))
    return text if len(text) <= 120 else text[:117] + "..."


@dataclass
class Tally:
    """What one operation cost: statements (of them transaction control), hops and direct calls."""

    statements: int = 0
    control: int = 0
    hops: int = 0
    direct: int = 0

    @property
    def round_trips(self) -> int:
        return self.hops + self.direct


@dataclass
class StatementCounter:
    """A `StoreObserver` that counts, by operation; called from any thread."""

    by_operation: dict[str, Tally] = field(default_factory=dict)
    texts: Counter[tuple[str, str]] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def statement(self, operation: str | None, sql: str) -> None:
        words = sql.split(None, 1)
        control = bool(words) and words[0].upper() in _TRANSACTION_CONTROL
        with self._lock:
            tally = self.by_operation.setdefault(operation or _NONE, Tally())
            tally.statements += 1
            tally.control += control
            self.texts[(operation or _NONE, shape(sql))] += 1

    def round_trip(self, operation: str | None, kind: RoundTrip) -> None:
        with self._lock:
            tally = self.by_operation.setdefault(operation or _NONE, Tally())
            if kind == "hop":
                tally.hops += 1
            else:
                tally.direct += 1

    def reset(self) -> None:
        with self._lock:
            self.by_operation.clear()
            self.texts.clear()

    def snapshot(self) -> tuple[dict[str, Tally], list[tuple[str, str, int]]]:
        """The tallies by operation, and each distinct statement text with its count, most frequent first."""
        with self._lock:
            tallies = {name: Tally(**vars(t)) for name, t in self.by_operation.items()}
            texts = sorted(((op, sql, n) for (op, sql), n in self.texts.items()), key=lambda t: (-t[2], t[0]))
        return tallies, texts


def _sum(tallies: Iterable[Tally]) -> Tally:
    total = Tally()
    for t in tallies:
        total.statements += t.statements
        total.control += t.control
        total.hops += t.hops
        total.direct += t.direct
    return total


@contextmanager
def counting() -> Iterator[StatementCounter]:
    """A counter installed as the store's observer for the block (connections opened in it are traced)."""
    counter = StatementCounter()
    observer.install(counter)
    try:
        yield counter
    finally:
        observer.install(None)


@contextmanager
def redis_round_trips() -> Iterator[Counter[str]]:
    """Count the commands the rate-limit storage sends to Redis (each one exchange: `limits`' redis-py
    bridge sends one command, mostly a Lua script's EVALSHA, per call), by command name, for the block.

    redis-py has no tracing hook of its own, so the bench wraps its client's one command entry
    point; the gateway's code is untouched.
    """
    from redis.asyncio.client import Redis

    counts: Counter[str] = Counter()
    original = Redis.execute_command

    async def counted(self: Redis, *args: Any, **options: Any) -> Any:
        counts[str(args[0]).upper() if args else "?"] += 1
        return await original(self, *args, **options)

    Redis.execute_command = counted  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        Redis.execute_command = original  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class JobCost:
    backend: str
    database: Literal["sqlite", "postgresql"]
    jobs: int
    calls_per_job: float
    seconds: float
    total: Tally
    by_operation: dict[str, Tally]
    texts: list[tuple[str, str, int]]
    redis_round_trips: int = 0  # rate-limit commands (and pipelines) sent to Redis: not SQL, shown apart

    def per_job(self, value: int) -> float:
        return value / self.jobs

    def breakdown(self) -> list[str]:
        """Lines of the per-operation table, costliest first, per job."""
        rows = sorted(self.by_operation.items(), key=lambda kv: (-kv[1].statements, kv[0]))
        lines = [f"{'operation':<34} {'statements':>10} {'of them txn':>11} {'round trips':>11} {'hops':>6}"]
        for name, tally in [*rows, ("total", self.total)]:
            lines.append(
                f"{name:<34} {self.per_job(tally.statements):>10.2f} {self.per_job(tally.control):>11.2f} "
                f"{self.per_job(tally.round_trips):>11.2f} {self.per_job(tally.hops):>6.2f}"
            )
        return lines


def _config(directory: Path, files: env.GatewayFiles) -> Config:
    # Production's timings; the fault-injecting adapter registered with no faults. On PostgreSQL
    # the rate limits live in Redis (a PostgreSQL gateway refuses a storage that is not shared).
    return Config(
        database=files.database,
        policy_path=files.policy,
        data_dir=directory,
        faults="ok",
        faults_dir=directory / "provider",
        rate_storage=env.REDIS_STORAGE if files.url else None,
    )


async def measure(directory: Path, backend: str, *, warm_up: int, jobs: int, url: str | None = None) -> JobCost:
    """Run `warm_up` then `jobs` Bell jobs on `backend` through an in-process gateway, counting;
    on the PostgreSQL database at `url` when given (else a SQLite file in `directory`)."""
    from qpu_gateway.jobs.runtime import Gateway
    from qpu_gateway.mcp.app import build_server

    files = await env.gateway_files(directory, policies.counting(), url=url)
    with counting() as counter, redis_round_trips() as redis:
        gateway = Gateway(_config(directory, files))
        async with gateway.running():
            server = build_server(gateway, lambda: files.key)
            async with Client(server, mode=env.MODE, read_timeout_seconds=600) as client:  # type: ignore[arg-type]
                await client.list_tools()
                for _ in range(warm_up):
                    await _one_job(client, backend)
                counter.reset()
                redis.clear()
                began = time.monotonic()
                calls = 0
                for _ in range(jobs):
                    calls += await _one_job(client, backend)
                seconds = time.monotonic() - began
                by_operation, texts = counter.snapshot()
                redis_trips = sum(redis.values())
    database = "postgresql" if url else "sqlite"
    total = _sum(by_operation.values())
    return JobCost(backend, database, jobs, calls / jobs, seconds, total, by_operation, texts, redis_trips)


async def _one_job(client: Client, backend: str) -> int:
    """Submit, wait for the counts; the MCP calls it took."""
    submitted = await tools.ok(client, "submit_job", {"circuit": BELL, "shots": SHOTS, "backend": backend})
    job_id = str(submitted["job_id"])
    job, waits = await tools.await_job(client, job_id)
    if not (job.get("result") or {}).get("counts"):
        raise tools.UnexpectedAnswer(f"job {job_id} on {backend} ended without counts")
    return 1 + waits


def _row(cost: JobCost) -> Row:
    per_job = cost.per_job(cost.total.statements)
    return Row(
        f"SQL statements per job, {cost.backend}, {cost.database}",
        "statements",
        Summary.of([BUDGET]),
        Summary.of([per_job]),
        Target("<=", 1.0),
        "issue 13's budget",
        notes=[
            f"{cost.jobs} Bell jobs ({SHOTS} shots) one after another after warm-up, submit_job + wait_for_job "
            f"({cost.calls_per_job:.2f} calls per job), {cost.seconds:.1f} s",
            f"transaction control (BEGIN/COMMIT/SAVEPOINT/RELEASE) {cost.per_job(cost.total.control):.2f} of them",
            f"round trips {cost.per_job(cost.total.round_trips):.2f} per job: {cost.per_job(cost.total.hops):.2f} hops "
            + (
                "(exchanges with the server: a query, or a pipeline's flush or sync)"
                if cost.database == "postgresql"
                else f"to a connection's thread, {cost.per_job(cost.total.direct):.2f} direct calls on the loop's "
                "thread"
            ),
            *(
                [f"Redis round trips (rate limits, not SQL) {cost.per_job(cost.redis_round_trips):.2f} per job"]
                if cost.database == "postgresql"
                else []
            ),
        ],
        extra={
            "statements_per_job": per_job,
            "round_trips_per_job": cost.per_job(cost.total.round_trips),
            "hops_per_job": cost.per_job(cost.total.hops),
            "database": cost.database,
            "redis_round_trips_per_job": cost.per_job(cost.redis_round_trips),
            "by_operation": {
                name: {
                    "statements": cost.per_job(t.statements),
                    "transaction_control": cost.per_job(t.control),
                    "round_trips": cost.per_job(t.round_trips),
                    "hops": cost.per_job(t.hops),
                }
                for name, t in cost.by_operation.items()
            },
            "statements": [{"operation": op, "sql": sql, "per_job": n / cost.jobs} for op, sql, n in cost.texts],
        },
        details=cost.breakdown(),
    )


async def run(ctx: Context, names: set[str]) -> list[Row]:
    """Each backend on SQLite (a file of its own), then on PostgreSQL (a fresh database of its own each)."""
    rows = []
    for database in DATABASES:
        for backend in BACKENDS:
            directory = ctx.scratch(f"statements-{database}-{backend.replace('/', '-')}")
            kwargs = {"warm_up": ctx.pick(5, 3), "jobs": ctx.pick(50, 10)}
            if database == "postgresql":
                with env.postgres_database() as url:
                    cost = await measure(directory, backend, url=url, **kwargs)
            else:
                cost = await measure(directory, backend, **kwargs)
            ctx.log(
                f"statements {backend} on {database}: {cost.per_job(cost.total.statements):.1f} per job, "
                f"{cost.per_job(cost.total.round_trips):.1f} round trips"
                + (f", {cost.per_job(cost.redis_round_trips):.1f} Redis round trips" if cost.redis_round_trips else "")
            )
            rows.append(_row(cost))
    return rows
