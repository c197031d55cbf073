"""A fault-injecting adapter for tests and the chaos suite: misbehaves on purpose, then runs on Aer.

Registered only when the configuration names a fault spec (`QPU_GATEWAY_FAULTS` or
`Config.faults`), never by default. It stands in for a provider's hardware (backend
`faulty/qpu`), so policy on hardware and every failure path can be exercised without a cloud.

Two kinds of spec:

- A schedule, consumed one entry per submit call: `ok`, `transient`, `quota`, `permanent`,
  `slow:SECONDS` (`"transient,slow:0.5,ok"`), `hold:SECONDS` (accepted at once, then running
  at the provider for SECONDS unless it is cancelled there; needs a provider directory), `hang`
  (accepted, then running until cancelled) and `internal` (raises what a half-imported SDK raises,
  an ImportError, before anything reaches the provider: a failure of the gateway, not of the
  job). Once it runs out, every call is `ok`.
- A mix, `mix:transient=0.3,quota=0.05,permanent=0.05,slow=0.05,slow_s=5,seed=1,...`: each job
  draws its fate once from its id and the seed, so every process that handles the job agrees.
  A transient job fails its first 1..`transient_tries` submits, then succeeds; a quota or
  permanent job fails every submit; a slow job's submits take `slow_s` seconds; a hung job is
  accepted and then runs at the provider until it is cancelled (for the wall-clock cap).

With a provider directory (`QPU_GATEWAY_FAULTS_DIR` or `Config.faults_dir`) the adapter keeps
the provider's side in `provider.db` there, shared by every gateway process, as a real provider
would: every submit call it received and what it answered (`calls`), and every job it accepted
and ran (`runs`). A submit whose job id it already accepted is answered with the same job and
runs nothing (the idempotency token every cloud adapter sends), so `runs` counts what was really
executed and billed. A cancel reaching the provider is recorded too (`calls` outcome `cancel`,
and the run's `cancelled_at`): a run cancelled before it executed never does. Files there steer
it from outside: `down` makes every submit fail transiently (an outage, for the circuit breaker)
while it exists; `unlisted` makes listing its backends fail as a half-imported SDK does (an
ImportError) while it exists; and `kill-after-accept` makes the next process that accepts a job
delete it and SIGKILL itself before returning the job to the gateway: a crash exactly between
"provider accepted" and "state saved".
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import anyio

from qpu_gateway.adapters import sdk_thread
from qpu_gateway.adapters.aer import AerAdapter
from qpu_gateway.adapters.base import (
    Backend,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    ProviderStatus,
    QuotaError,
    Result,
    TransientError,
    Usage,
)

BACKEND_ID = "faulty/qpu"
_KINDS = {"ok", "transient", "quota", "permanent", "slow", "hold", "hang", "internal"}
# What the first import of Qiskit from two threads at once raised in a real run.
_HALF_IMPORTED = "injected internal fault: cannot import name 'DAGCircuit' from partially initialized module"

_MIX_KEYS = {"transient", "quota", "permanent", "slow", "hang", "slow_s", "seed", "transient_tries", "price_usd"}
_REF_PREFIX = "faulty-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, at REAL NOT NULL, pid INTEGER NOT NULL, outcome TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS calls_job ON calls (job_id);
CREATE TABLE IF NOT EXISTS runs (
    job_id TEXT NOT NULL, accepted_at REAL NOT NULL, pid INTEGER NOT NULL,
    counts TEXT, cost_micro_usd INTEGER NOT NULL, spec TEXT NOT NULL,
    hold_until REAL,  -- a held run waits at the provider until then (unless cancelled)
    cancelled_at REAL
);
CREATE INDEX IF NOT EXISTS runs_job ON runs (job_id);
"""


def parse_schedule(text: str) -> list[tuple[str, float]]:
    """`"transient,slow:0.5,ok"` -> [("transient", 0), ("slow", 0.5), ("ok", 0)]."""
    steps: list[tuple[str, float]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        kind, _, arg = item.partition(":")
        if kind not in _KINDS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(sorted(_KINDS))}")
        steps.append((kind, float(arg) if arg else 0.0))
    return steps


@dataclass(frozen=True)
class Mix:
    """Fractions of jobs per fate, and how the fates behave."""

    transient: float = 0.0
    quota: float = 0.0
    permanent: float = 0.0
    slow: float = 0.0
    hang: float = 0.0
    slow_s: float = 2.0
    seed: int = 0
    transient_tries: int = 2  # a transient job fails 1..this many submits before one succeeds
    price_usd: float = 0.0  # what the provider bills per run it executes

    @classmethod
    def parse(cls, text: str) -> Mix:
        """`"transient=0.3,quota=0.05"` -> Mix(transient=0.3, quota=0.05)."""
        values: dict[str, float] = {}
        for raw in text.split(","):
            key, sep, value = raw.strip().partition("=")
            if not key:
                continue
            if key not in _MIX_KEYS or not sep:
                known = ", ".join(sorted(_MIX_KEYS))
                raise ValueError(f"unknown mix entry {raw.strip()!r}; use key=value with {known}")
            values[key] = float(value)
        mix = cls(
            **{k: v for k, v in values.items() if k not in ("seed", "transient_tries")},
            seed=int(values.get("seed", 0)),
            transient_tries=int(values.get("transient_tries", 2)),
        )
        if mix.transient + mix.quota + mix.permanent + mix.slow + mix.hang > 1:
            raise ValueError("the mix's fractions add up to more than 1")
        return mix

    def fate(self, job_id: str) -> tuple[str, int]:
        """The job's fate and, for a transient job, how many submits fail first."""
        # A digest, not a PRNG: every process must draw the same fate for the same job.
        digest = hashlib.sha256(f"{self.seed}:{job_id}".encode()).digest()
        roll = int.from_bytes(digest[:8], "big") / 2**64
        tries = 1 + int.from_bytes(digest[8:12], "big") % max(1, self.transient_tries)
        for kind in ("transient", "quota", "permanent", "slow", "hang"):
            share: float = getattr(self, kind)
            if roll < share:
                return kind, tries if kind == "transient" else 0
            roll -= share
        return "ok", 0


class ProviderLedger:
    """The fake provider's own records, in a SQLite file every gateway process shares."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.path = directory / "provider.db"
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        return db

    @property
    def down(self) -> bool:
        return (self.directory / "down").exists()

    @property
    def unlisted(self) -> bool:
        return (self.directory / "unlisted").exists()

    def take_kill_trigger(self) -> bool:
        """True in exactly one process once `kill-after-accept` exists (it deletes the file)."""
        try:
            (self.directory / "kill-after-accept").unlink()
        except FileNotFoundError:
            return False
        return True

    def decide(
        self, job: JobSpec, choose: str, failures_before_ok: int, price_micro_usd: int, hold_s: float = 0.0
    ) -> str:
        """Answer one submit call, atomically: 'duplicate', 'accepted', or the fault it gets."""
        job_id = job.job_id
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            accepted = db.execute("SELECT 1 FROM runs WHERE job_id = ?", (job_id,)).fetchone()
            (transients,) = db.execute(
                "SELECT count(*) FROM calls WHERE job_id = ? AND outcome = 'transient'", (job_id,)
            ).fetchone()
            if self.down:
                outcome = "transient"
            elif accepted:
                outcome = "duplicate"
            elif choose == "transient" and transients < failures_before_ok:
                outcome = "transient"
            elif choose in ("quota", "permanent"):
                outcome = choose
            else:
                outcome = "accepted"
            db.execute(
                "INSERT INTO calls (job_id, at, pid, outcome) VALUES (?, ?, ?, ?)",
                (job_id, time.time(), os.getpid(), outcome),
            )
            if outcome == "accepted":
                now = time.time()
                hold_until = now + hold_s if choose == "hold" else None
                db.execute(
                    "INSERT INTO runs (job_id, accepted_at, pid, counts, cost_micro_usd, spec, hold_until) "
                    "VALUES (?, ?, ?, NULL, ?, ?, ?)",
                    (job_id, now, os.getpid(), price_micro_usd, _spec_json(job, hang=choose == "hang"), hold_until),
                )
            db.execute("COMMIT")
            return outcome
        finally:
            db.close()

    def finish(self, job_id: str, counts: str) -> None:
        with self._connect() as db:
            db.execute("UPDATE runs SET counts = ? WHERE job_id = ? AND counts IS NULL", (counts, job_id))

    def run_of(self, job_id: str) -> tuple[str | None, int, int] | None:
        """(counts JSON or None while running, pid running it, cost) of the job's first run."""
        with self._connect() as db:
            row = db.execute(
                "SELECT counts, pid, cost_micro_usd FROM runs WHERE job_id = ? ORDER BY rowid LIMIT 1", (job_id,)
            ).fetchone()
        return None if row is None else (row[0], int(row[1]), int(row[2]))

    def held(self, job_id: str) -> tuple[float | None, float | None]:
        """(hold_until, cancelled_at) of the job's run."""
        with self._connect() as db:
            row = db.execute("SELECT hold_until, cancelled_at FROM runs WHERE job_id = ?", (job_id,)).fetchone()
        return (None, None) if row is None else (row[0], row[1])

    def release(self, job_id: str) -> JobSpec | None:
        """A held run whose time is up: the spec to execute if this process took it, else None."""
        with self._connect() as db:
            row = db.execute(
                "UPDATE runs SET hold_until = NULL, pid = ? WHERE job_id = ? AND counts IS NULL "
                "AND hold_until <= ? AND cancelled_at IS NULL RETURNING spec",
                (os.getpid(), job_id, time.time()),
            ).fetchone()
        return None if row is None else _spec_of(job_id, row[0])

    def cancel(self, job_id: str) -> None:
        """The provider's side of a cancel: recorded, and a run not executed yet never will be."""
        with self._connect() as db:
            db.execute(
                "INSERT INTO calls (job_id, at, pid, outcome) VALUES (?, ?, ?, 'cancel')",
                (job_id, time.time(), os.getpid()),
            )
            db.execute(
                "UPDATE runs SET cancelled_at = ? WHERE job_id = ? AND counts IS NULL AND cancelled_at IS NULL",
                (time.time(), job_id),
            )

    def take_over(self, job_id: str, dead_pid: int) -> JobSpec | None:
        """Carry on a run whose process died: the spec to run if this process won it, else None."""
        with self._connect() as db:
            moved = db.execute(
                "UPDATE runs SET pid = ? WHERE job_id = ? AND counts IS NULL AND pid = ?",
                (os.getpid(), job_id, dead_pid),
            ).rowcount
            if not moved:
                return None
            (spec,) = db.execute("SELECT spec FROM runs WHERE job_id = ?", (job_id,)).fetchone()
        if json.loads(spec).get("hang"):
            return None  # a hung run stays running, whoever polls it, until it is cancelled
        return _spec_of(job_id, spec)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FaultyAdapter:
    """Wraps `AerAdapter`; each submit first meets its scheduled or drawn fault."""

    provider = "faulty"

    def __init__(self, spec: str, directory: Path | None = None) -> None:
        self._mix = Mix.parse(spec.removeprefix("mix:")) if spec.startswith("mix:") else None
        self._steps = [] if self._mix is not None else parse_schedule(spec)
        self._aer = AerAdapter()
        self._lock = threading.Lock()
        self._ledger = ProviderLedger(directory) if directory is not None else None
        if self._ledger is None and any(kind == "hold" for kind, _ in self._steps):
            raise ValueError("the hold fault needs a provider directory (QPU_GATEWAY_FAULTS_DIR) to keep its runs")
        self._hung: dict[str, bool] = {}  # without a ledger: hung job id -> cancelled yet
        self.submits = 0  # every submit call this process made, faulted or not
        self.cancels = 0  # cancel calls that reached this provider

    @property
    def executions(self) -> int:
        return self._aer.executions

    def _next_step(self) -> tuple[str, float]:
        with self._lock:
            return self._steps.pop(0) if self._steps else ("ok", 0.0)

    async def backends(self) -> list[Backend]:
        if self._ledger is not None and self._ledger.unlisted:
            raise ImportError(_HALF_IMPORTED)
        (aer,) = await self._aer.backends()
        return [
            Backend(
                id=BACKEND_ID,
                provider=self.provider,
                name="qpu",
                qubits=aer.qubits,
                simulator=False,
                status="online",
            )
        ]

    async def submit(self, job: JobSpec) -> ProviderRef:
        with self._lock:
            self.submits += 1
        if self._mix is not None:
            kind, failures = self._mix.fate(job.job_id)
            arg = self._mix.slow_s if kind == "slow" else 0.0
        else:
            kind, arg = self._next_step()
            failures = 1 if kind == "transient" else 0
        if kind == "internal":
            raise ImportError(_HALF_IMPORTED)
        if kind == "slow":
            await anyio.sleep(arg)
        if self._ledger is None:
            _raise_for(kind)
            if kind == "hang":
                self._hung.setdefault(job.job_id, False)
                return ProviderRef(provider_job_id=_REF_PREFIX + job.job_id)
            return await self._aer.submit(job)
        return await self._submit_recorded(job, kind, failures, hold_s=arg if kind == "hold" else 0.0)

    async def _submit_recorded(self, job: JobSpec, kind: str, failures: int, *, hold_s: float = 0.0) -> ProviderRef:
        assert self._ledger is not None
        ledger = self._ledger
        price = round((self._mix.price_usd if self._mix else 0.0) * 1_000_000)
        outcome = await sdk_thread.run_sync(lambda: ledger.decide(job, kind, failures, price, hold_s))
        _raise_for(outcome)
        ref = ProviderRef(provider_job_id=_REF_PREFIX + job.job_id)
        if outcome == "duplicate" or kind in ("hold", "hang"):
            return ref  # already accepted under this job id (nothing runs twice), or held or left running
        await self._execute(job)
        if ledger.take_kill_trigger():
            os.kill(os.getpid(), signal.SIGKILL)
        return ref

    async def _execute(self, job: JobSpec) -> None:
        assert self._ledger is not None
        ledger = self._ledger
        try:
            await self._aer.submit(job)
            result = await self._aer.result(ProviderRef(job.job_id))
            counts = json.dumps([dict(c) for c in result.counts], sort_keys=True)
        except PermanentError as exc:
            counts = json.dumps({"failed": str(exc)})
        await sdk_thread.run_sync(lambda: ledger.finish(job.job_id, counts))

    async def _run_of(self, ref: ProviderRef) -> tuple[str, tuple[str | None, int, int] | None]:
        """The job id behind `ref`, and the provider's record of its run (None if it has none)."""
        assert self._ledger is not None
        ledger = self._ledger
        job_id = ref.provider_job_id.removeprefix(_REF_PREFIX)
        return job_id, await sdk_thread.run_sync(lambda: ledger.run_of(job_id))

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        if self._ledger is None:
            hung = self._hung.get(ref.provider_job_id.removeprefix(_REF_PREFIX))
            if hung is not None:
                return ProviderStatus(ProviderState.CANCELLED if hung else ProviderState.RUNNING)
            return await self._aer.status(ref)
        ledger = self._ledger
        job_id, run = await self._run_of(ref)
        if run is None:
            return ProviderStatus(ProviderState.UNKNOWN, "the provider has no such job")
        counts, pid, _ = run
        if counts is None:
            hold_until, cancelled_at = await sdk_thread.run_sync(lambda: ledger.held(job_id))
            if cancelled_at is not None:
                return ProviderStatus(ProviderState.CANCELLED, "cancelled at the provider")
            if hold_until is not None:
                if time.time() < hold_until:
                    return ProviderStatus(ProviderState.RUNNING)
                spec = await sdk_thread.run_sync(lambda: ledger.release(job_id))
                if spec is not None:
                    await self._execute(spec)
                return await self.status(ref)
            # The process standing in for the provider died mid-run; a real provider carries on
            # with its run, so this process finishes that same run (it is not a second one).
            spec = None if _alive(pid) else await sdk_thread.run_sync(lambda: ledger.take_over(job_id, pid))
            if spec is not None:
                await self._execute(spec)
                return await self.status(ref)
            return ProviderStatus(ProviderState.RUNNING)
        outcome = json.loads(counts)
        if "failed" in outcome:
            return ProviderStatus(ProviderState.FAILED, outcome["failed"])
        if "cancelled" in outcome:
            return ProviderStatus(ProviderState.CANCELLED)
        return ProviderStatus(ProviderState.DONE)

    async def result(self, ref: ProviderRef) -> Result:
        if self._ledger is None:
            return await self._aer.result(ref)
        _, run = await self._run_of(ref)
        if run is None or run[0] is None:
            raise TransientError("the provider has no result for this job yet", code="result_not_ready")
        counts = tuple(json.loads(run[0]))
        return Result(counts=counts, cost_micro_usd=run[2], metadata={"provider": "faulty"})

    async def cancel(self, ref: ProviderRef) -> None:
        with self._lock:
            self.cancels += 1
        job_id = ref.provider_job_id.removeprefix(_REF_PREFIX)
        if self._ledger is None:
            if job_id in self._hung:
                self._hung[job_id] = True
            else:
                await self._aer.cancel(ref)
            return
        ledger = self._ledger
        await sdk_thread.run_sync(lambda: ledger.cancel(job_id))

    async def usage(self, ref: ProviderRef) -> Usage:
        """What the provider bills for the job: its price per run it accepted (a cancelled run too)."""
        if self._ledger is None:
            return Usage(cost_micro_usd=0)
        _, run = await self._run_of(ref)
        return Usage(cost_micro_usd=0 if run is None else run[2])


def _raise_for(kind: str) -> None:
    if kind == "transient":
        raise TransientError("injected transient fault (HTTP 503 from the provider)", code="http_503")
    if kind == "quota":
        raise QuotaError("injected provider quota fault: monthly allocation used up", code="allocation_exhausted")
    if kind == "permanent":
        raise PermanentError("injected permanent fault: the provider rejected the circuit", code="circuit_rejected")


def _spec_json(job: JobSpec, *, hang: bool = False) -> str:
    spec = {"backend": job.backend, "circuits": list(job.circuits), "shots": job.shots, "hang": hang}
    return json.dumps(spec)


def _spec_of(job_id: str, spec: str) -> JobSpec:
    data = json.loads(spec)
    return JobSpec(job_id=job_id, backend=data["backend"], circuits=tuple(data["circuits"]), shots=data["shots"])
