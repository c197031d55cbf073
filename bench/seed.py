"""Put N finished jobs in a gateway database, fast, in the store's own schema.

How, and why it is honest: the schema comes from the store itself (`open_store` applies the
shipped migrations), and every row is one the gateway would have written for a 5-qubit,
100-shot job of the bench agent on `aer/simulator`: the job row with its source, its counts and
its settled reservation (the `ledger` columns), and its audit rows (submit_job, job.claimed,
job.running and the terminal event), hash-chained with the gateway's own `chain_hash`, so
`qpu-gateway audit verify` accepts the file. What is not the gateway's doing is the speed: the
rows go in with one `executemany` per table in a single transaction instead of four write
transactions per job, which turns hours of admission into seconds. Finished jobs are what
accumulate in a long-lived database: 90% succeeded, 5% failed, 5% cancelled, spread over the 30
days before now.

Two shortcuts, neither read by get_job or list_jobs: `fingerprint` is the sha256 of the source
text (unique per job, as the parsed-circuit fingerprint is) and `depth`/`two_qubit_gates` are
those of the bench circuits' shape.
"""

from __future__ import annotations

import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.circuits import QUBITS, SHOTS, circuit
from qpu_gateway.audit.chain import GENESIS, chain_hash

DAY_S = 86_400.0
BACKEND = "aer/simulator"


def _counts(rng: random.Random) -> dict[str, dict[str, int]]:
    """Counts shaped like a 5-qubit, 100-shot run: up to 32 outcomes summing to 100."""
    outcomes: dict[str, int] = {}
    for _ in range(SHOTS):
        key = format(rng.getrandbits(QUBITS), f"0{QUBITS}b")
        outcomes[key] = outcomes.get(key, 0) + 1
    return {"c": outcomes}


def _job_rows(n: int, agent: str, key_id: str, now: float, rng: random.Random) -> Iterator[dict[str, Any]]:
    start = now - 30 * DAY_S
    step = 30 * DAY_S / max(n, 1)
    for i in range(n):
        source = circuit(i, seed=7)
        created = start + i * step
        started, finished = created + 0.02, created + 0.05
        roll = rng.random()
        state = "succeeded" if roll < 0.90 else "failed" if roll < 0.95 else "cancelled"
        ran = state != "cancelled"
        job_id = f"job_{rng.getrandbits(80):020x}"
        yield {
            "id": job_id,
            "agent": agent,
            "project": "default",
            "key_id": key_id,
            "name": f"seeded-{i}" if i % 3 == 0 else None,
            "backend": BACKEND,
            "shots": SHOTS,
            "circuits": json.dumps([source]),
            "n_circuits": 1,
            "qubits": QUBITS,
            "depth": 8,
            "two_qubit_gates": QUBITS - 1,
            "fingerprint": hashlib.sha256(source.encode()).hexdigest(),
            "estimate_micro_usd": 0,
            "state": state,
            "version": 4 if ran else 2,
            "attempts": 1 if ran else 0,
            "runs": 1 if ran else 0,
            "created_at": created,
            "updated_at": finished,
            "started_at": started if ran else None,
            "finished_at": finished,
            "provider_ref": job_id if state == "succeeded" else None,  # Aer's reference is the job id
            "result": json.dumps([_counts(rng)]) if state == "succeeded" else None,
            "error_code": "provider_error" if state == "failed" else None,
            "error_message": "Aer could not run the circuit: seeded failure" if state == "failed" else None,
            "payload_hash": hashlib.sha256(f"payload-{i}".encode()).hexdigest(),
        }


_JOB_COLUMNS = (
    "id, agent, project, key_id, name, backend, shots, circuits, n_circuits, qubits, depth, two_qubit_gates, "
    "fingerprint, estimate_micro_usd, state, version, attempts, runs, created_at, updated_at, started_at, "
    "finished_at, provider_ref, result, error_code, error_message, payload_hash"
)
_LEDGER_COLUMNS = (
    "ledger_status, ledger_day, ledger_month, ledger_micro_usd, ledger_shots, ledger_qpu_millis, settled_at"
)


def _audit_events(job: dict[str, Any], key_id: str) -> list[dict[str, Any]]:
    """The audit rows the gateway writes for a job that ended this way, in order."""
    base = {"agent": job["agent"], "project": job["project"], "job_id": job["id"], "error_code": None}
    submit = {**base, "at": job["created_at"], "key_id": key_id, "tool": "submit_job", "decision": "ok"}
    submit.update(args_hash=job["payload_hash"], detail=None)
    if job["state"] == "cancelled":
        cancelled = {**base, "at": job["finished_at"], "key_id": None, "tool": "job.cancelled", "decision": "event"}
        call = {**base, "at": job["finished_at"], "key_id": key_id, "tool": "cancel_job", "decision": "ok"}
        return [submit, {**cancelled, "args_hash": None, "detail": None}, {**call, "args_hash": None, "detail": None}]
    events = [
        ("job.claimed", job["started_at"], "worker seeded:1:000000, run 1"),
        ("job.running", job["started_at"], None),
        (f"job.{job['state']}", job["finished_at"], job["error_message"]),
    ]
    rows = [submit]
    for tool, at, detail in events:
        row = {**base, "at": at, "key_id": None, "tool": tool, "decision": "event", "args_hash": None}
        row.update(detail=detail, error_code=job["error_code"] if tool == "job.failed" else None)
        rows.append(row)
    return rows


def seed(db: Path, n: int, *, agent: str, key_id: str, seed_value: int = 6) -> float:
    """Add `n` finished jobs of `agent` (key `key_id`) to a migrated database; returns the seconds taken."""
    began = time.perf_counter()
    rng = random.Random(seed_value)
    now = time.time()
    jobs = list(_job_rows(n, agent, key_id, now, rng))
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        columns = f"{_JOB_COLUMNS}, {_LEDGER_COLUMNS}"
        placeholders = ", ".join("?" for _ in columns.split(", "))
        names = _JOB_COLUMNS.split(", ")
        conn.executemany(
            f"INSERT INTO jobs ({columns}) VALUES ({placeholders})",
            ((*(job[c] for c in names), *_reservation(job)) for job in jobs),
        )
        conn.executemany(
            "INSERT INTO audit (seq, at, agent, project, key_id, tool, decision, error_code, args_hash, job_id, "
            "detail, prev_hash, row_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _chained_audit(conn, jobs, key_id),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()
    return time.perf_counter() - began


def _reservation(job: dict[str, Any]) -> tuple[Any, ...]:
    """The job's settled reservation (its `ledger` columns): committed if it succeeded, else released."""
    moment = datetime.fromtimestamp(job["created_at"], UTC)
    status = "committed" if job["state"] == "succeeded" else "released"
    return (status, moment.strftime("%Y-%m-%d"), moment.strftime("%Y-%m"), 0, SHOTS, 0, job["finished_at"])


def _chained_audit(conn: sqlite3.Connection, jobs: list[dict[str, Any]], key_id: str) -> Iterator[tuple[Any, ...]]:
    """Audit rows after the file's last one, each chained to the one before, as the store chains them."""
    [(last_seq, last_hash)] = conn.execute(
        "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'audit'), 0), "
        "coalesce((SELECT max(seq) FROM audit), 0)), (SELECT row_hash FROM audit ORDER BY seq DESC LIMIT 1)"
    ).fetchall()
    seq, prev = int(last_seq), last_hash or GENESIS
    for job in jobs:
        for event in _audit_events(job, key_id):
            seq += 1
            content = {
                "seq": seq,
                "at": float(event["at"]),
                "agent": event["agent"],
                "project": event["project"],
                "key_id": event["key_id"],
                "tool": event["tool"],
                "decision": event["decision"],
                "error_code": event["error_code"],
                "args_hash": event["args_hash"],
                "job_id": event["job_id"],
                "detail": event["detail"],
            }
            row_hash = chain_hash(prev, content)
            yield (*content.values(), prev, row_hash)
            prev = row_hash
