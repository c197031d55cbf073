"""The chaos suite's machinery: real gateway processes, agents that behave like careful clients,
and the books (the gateway's database and the fake provider's) read back to count what went wrong.

Nothing here imitates the gateway: servers are `qpu-gateway serve` subprocesses, agents are MCP
clients over Streamable HTTP or stdio, and the figures come from the databases themselves (the
SQLite file, or a PostgreSQL database of the scenario's own, dropped when it ends).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from qpu_gateway.config import Database
from qpu_gateway.jobs.states import TERMINAL
from qpu_gateway.keys import SCOPES, create_key
from qpu_gateway.store import open_store

from ..databases import REDIS_STORAGE, create_postgres, drop_postgres, location
from ..databases import query as database_query
from ..support import free_port, http_client, set_up_database, stop_process, wait_listening

# The fake provider's hardware, priced per task so that a job's cost is known exactly: ten cents
# a job, whatever its shots (a round figure chosen for the suite, not a provider's price).
JOB_PRICE_USD = "0.10"
JOB_PRICE_MICRO = 100_000
BASE_POLICY = f"""
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
max_shots = 1000
loop_guard = {{ max_repeats = 100000, window_minutes = 1 }}
{{defaults}}
[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "{JOB_PRICE_USD}"
per_shot_usd = "0"
source = "chaos suite: a round price so that committed cost can be checked against the provider's bill"
"""


def circuit(index: int, qubits: int = 3) -> str:
    """A small circuit that differs by index, so the loop guard sees different work."""
    angle = (index % 997 + 1) / 1000
    body = "".join(f"rx({angle + q / 10:.4f}) q[{q}];\n" for q in range(qubits))
    return f'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[{qubits}];\ncreg c[{qubits}];\n{body}measure q -> c;\n'


@dataclass
class Row:
    """One line of the chaos table, and the invariants that did not hold (empty when all held)."""

    scenario: str
    jobs: int = 0
    lost: int = 0
    run_twice: int = 0
    left_reserved_micro: int = 0
    over_budget_micro: int = 0
    other: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, holds: bool, what: str) -> None:
        if not holds:
            self.broken.append(what)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "jobs": self.jobs,
            "lost": self.lost,
            "run_twice": self.run_twice,
            "left_reserved_usd": self.left_reserved_micro / 1e6,
            "over_budget_usd": self.over_budget_micro / 1e6,
            "other": self.other,
            "broken": self.broken,
            "seconds": round(self.seconds, 1),
        }


def render(rows: Iterable[Row]) -> str:
    header = ["scenario", "jobs", "lost", "run twice", "left reserved", "over budget", "other figures"]
    lines = [header]
    for row in rows:
        status = "" if not row.broken else "  BROKEN: " + "; ".join(row.broken)
        lines.append(
            [
                row.scenario,
                str(row.jobs),
                str(row.lost),
                str(row.run_twice),
                f"${row.left_reserved_micro / 1e6:.2f}",
                f"${row.over_budget_micro / 1e6:.2f}",
                "; ".join(row.other) + status,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for n, line in enumerate(lines):
        out.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])) + " | " + line[-1])
        if n == 0:
            out.append("-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    return "\n".join(out)


# -- the gateway's side --------------------------------------------------------------------------


@dataclass
class Site:
    """One scenario's files: the gateway database, its policy, the fake provider's directory."""

    root: Path
    lease_s: float = 3.0
    provider_root: Path | None = None  # elsewhere when the gateway's disk is the thing under test
    backend: str = "sqlite"  # or "postgresql": a fresh database of its own, dropped by `close`
    url: str | None = None

    def __post_init__(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)  # a scenario always starts from nothing
        self.root.mkdir(parents=True, exist_ok=True)
        self.provider_dir.mkdir(parents=True, exist_ok=True)
        if self.backend == "postgresql":
            self.url = create_postgres("qpg_chaos")

    def close(self) -> None:
        """Drop the scenario's PostgreSQL database (a SQLite site's files stay for reading)."""
        if self.url is not None:
            drop_postgres(self.url)
            self.url = None

    @property
    def db(self) -> Path:
        """The SQLite file (scenarios about the file itself run on SQLite only)."""
        return self.root / "gateway.db"

    @property
    def database(self) -> Database:
        return Database(url=self.url) if self.url is not None else Database(path=self.db)

    @property
    def policy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def provider_dir(self) -> Path:
        return self.provider_root or self.root / "provider"

    def write_policy(self, extra: str = "", *, defaults: str = "") -> None:
        """The suite's policy; `defaults` adds keys to [defaults], `extra` adds tables after it."""
        self.policy.write_text(BASE_POLICY.replace("{defaults}", defaults) + extra, encoding="utf-8")

    def env(self, faults: str | None, **more: str) -> dict[str, str]:
        env = {
            "QPU_GATEWAY_LEASE_S": str(self.lease_s),
            "QPU_GATEWAY_POLL_S": "0.1",
            "QPU_GATEWAY_RETRY_BASE_S": "0.2",
            "QPU_GATEWAY_BREAKER_COOLDOWN_S": "2",
            "QPU_GATEWAY_FAULTS_DIR": str(self.provider_dir),
            "QPU_GATEWAY_BUSY_TIMEOUT_S": "2",  # a locked database is refused after 2 s, not 10
            **({"QPU_GATEWAY_RATE_STORAGE": REDIS_STORAGE} if self.url is not None else {}),
            **more,
        }
        if faults:
            env["QPU_GATEWAY_FAULTS"] = faults
        return env

    async def key(self, agent: str, project: str = "default") -> str:
        store = await open_store(self.database)
        try:
            _, key = await create_key(store, agent=agent, project=project, scopes=frozenset(SCOPES))
        finally:
            await store.close()
        return key

    def serve_args(self, transport: str, port: int | None = None, *, log_level: str = "info") -> list[str]:
        set_up_database(self.database)  # `serve` refuses a database nobody set up
        args = ["-m", "qpu_gateway", "serve", "--transport", transport, "--db", location(self.database)]
        args += ["--policy", str(self.policy), "--log-level", log_level]
        return args + (["--port", str(port)] if port is not None else [])

    def stdio(self, key: str, faults: str | None) -> StdioServerParameters:
        return StdioServerParameters(
            command=sys.executable,
            args=self.serve_args("stdio", log_level="error"),
            env={**os.environ, **self.env(faults), "QPU_GATEWAY_KEY": key},
            cwd=str(self.root),
        )

    # -- reading the books back (read-only SQL on the files themselves) --

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.url is not None:
            return database_query(self.database, sql, params)
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def provider_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        path = self.provider_dir / "provider.db"
        if not path.exists():
            return []
        db = sqlite3.connect(path, timeout=30)
        try:
            return db.execute(sql, params).fetchall()
        finally:
            db.close()

    def jobs(self) -> dict[str, dict[str, Any]]:
        rows = self.query("SELECT id, agent, state, error_code, result, runs, attempts FROM jobs")
        return {
            r[0]: {"agent": r[1], "state": r[2], "code": r[3], "result": r[4], "runs": r[5], "attempts": r[6]}
            for r in rows
        }

    def reserved_micro(self) -> int:
        [(total,)] = self.query("SELECT coalesce(sum(cost_micro_usd), 0) FROM ledger WHERE status = 'reserved'")
        return int(total)

    def committed_micro(self, column: str | None = None, who: str | None = None) -> int:
        where = f" AND {column} = ?" if column else ""
        params = (who,) if column else ()
        [(total,)] = self.query(
            f"SELECT coalesce(sum(cost_micro_usd), 0) FROM ledger WHERE status = 'committed'{where}",
            params,
        )
        return int(total)

    def provider_runs(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self.provider_query("SELECT job_id, count(*) FROM runs GROUP BY job_id")}

    def provider_bill_micro(self) -> int:
        rows = self.provider_query("SELECT coalesce(sum(cost_micro_usd), 0) FROM runs")
        return int(rows[0][0]) if rows else 0

    def provider_counts(self) -> dict[str, Any]:
        return {r[0]: json.loads(r[1]) for r in self.provider_query("SELECT job_id, counts FROM runs") if r[1]}

    def audit(self, tool: str) -> list[tuple[Any, ...]]:
        return self.query("SELECT seq, agent, decision, error_code, detail FROM audit WHERE tool = ?", (tool,))

    def integrity(self) -> str:
        """SQLite's integrity check of the file; PostgreSQL has none to run (its pages are checksummed
        by the server), so there the check is that the books could be read at all."""
        if self.url is not None:
            return "ok" if self.query("SELECT 1") == [(1,)] else "unreadable"
        [(answer,)] = self.query("PRAGMA integrity_check")
        return str(answer)

    def audit_verify(self) -> tuple[bool, str]:
        """`qpu-gateway audit verify`, as an operator runs it."""
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "qpu_gateway",
                "audit",
                "verify",
                "--db",
                location(self.database),
                "--policy",
                str(self.policy),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        return done.returncode == 0, (done.stdout + done.stderr).strip()


def settle_books(site: Site, row: Row, admitted: dict[str, str], *, expect_provider: bool = True) -> None:
    """The invariants every scenario shares, for the jobs agents were told were admitted."""
    jobs = site.jobs()
    row.jobs = len(admitted)
    missing = [job_id for job_id in admitted.values() if job_id not in jobs]
    unfinished = [job_id for job_id in admitted.values() if job_id in jobs and jobs[job_id]["state"] not in TERMINAL]
    row.lost = len(missing) + len(unfinished)
    row.check(not missing, f"{len(missing)} admitted job(s) missing from the database")
    row.check(not unfinished, f"{len(unfinished)} job(s) never finished")
    runs = site.provider_runs()
    row.run_twice = sum(1 for n in runs.values() if n > 1)
    row.check(row.run_twice == 0, f"{row.run_twice} job(s) run twice by the provider")
    row.left_reserved_micro = site.reserved_micro()
    row.check(row.left_reserved_micro == 0, "reservations left behind")
    if expect_provider:
        committed, billed = site.committed_micro(), site.provider_bill_micro()
        row.check(committed == billed, f"committed ${committed / 1e6:.2f} != provider bill ${billed / 1e6:.2f}")
        provider = site.provider_counts()
        differ = [
            j
            for j in admitted.values()
            if jobs.get(j, {}).get("state") == "succeeded" and json.loads(jobs[j]["result"]) != provider.get(j)
        ]
        row.check(not differ, f"{len(differ)} job(s) whose stored counts differ from the provider's run")
    row.check(site.integrity() == "ok", "database integrity check failed")


# -- server processes -----------------------------------------------------------------------------


@dataclass
class Server:
    """`qpu-gateway serve --transport http` as a subprocess; its stderr (the log) goes to a file."""

    site: Site
    faults: str | None
    name: str
    log_dir: Path | None = None  # the site's folder unless that is the disk under test
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def log_path(self) -> Path:
        return (self.log_dir or self.site.root) / f"{self.name}.log"

    def start(self) -> None:
        self.port = free_port()
        self.starts += 1
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.site.serve_args("http", self.port)],
                env={**os.environ, **self.site.env(self.faults)},
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd=str(self.site.root),
            )
        wait_listening(self.process, self.port, what=f"{self.name} (log: {self.log_path})", within_s=60)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no handing back, no flushing; the next process must recover from the file."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace_s=20)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


# -- agents -----------------------------------------------------------------------------------------


def answer(result: Any) -> dict[str, Any]:
    """A tool result's body: a success's structured content, or an error's {code, message, ...} (its text)."""
    if not result.is_error:
        return dict(result.structured_content or {})
    try:
        body = json.loads(result.content[0].text)
    except (IndexError, AttributeError, ValueError):
        body = {}
    return {"code": "unknown", **body} if isinstance(body, dict) else {"code": "unknown"}


class Agent:
    """A careful agent over HTTP: every submit carries an idempotency key, and a call that got no
    answer (its server died mid-call) is repeated on whichever server is up, until it is answered."""

    def __init__(self, name: str, key: str, servers: list[Server]) -> None:
        self.name = name
        self.key = key
        self.servers = servers
        self.admitted: dict[str, str] = {}  # idempotency key -> job id
        self.refused: dict[str, int] = {}
        self.reconnects = 0

    @asynccontextmanager
    async def _session(self, turn: int) -> AsyncIterator[Client]:
        live = [s for s in self.servers if s.alive] or self.servers
        server = live[turn % len(live)]
        async with http_client(server.url, self.key) as client:
            yield client

    async def run(self, calls: list[tuple[str, dict[str, Any]]], pause_s: float = 0.0) -> list[dict[str, Any]]:
        """Make each call in order, reconnecting as often as needed; the answers in order."""
        answers: list[dict[str, Any]] = []
        turn = hash(self.name) % 7
        pending = list(calls)
        while pending:
            try:
                async with self._session(turn) as client:
                    while pending:
                        name, args = pending[0]
                        with anyio.fail_after(120):
                            body = answer(await client.call_tool(name, args))
                        answers.append(body)
                        pending.pop(0)
                        self._note(name, args, body)
                        await anyio.sleep(pause_s)
            except Exception:  # the server died under us: reconnect and repeat the unanswered call
                self.reconnects += 1
                turn += 1
                await anyio.sleep(0.2)
        return answers

    def _note(self, name: str, args: dict[str, Any], body: dict[str, Any]) -> None:
        if name != "submit_job":
            return
        if "job_id" in body and "code" not in body:
            self.admitted[str(args.get("idempotency_key"))] = str(body["job_id"])
        else:
            code = str(body.get("code"))
            self.refused[code] = self.refused.get(code, 0) + 1


def submit_call(index: int, backend: str, *, tag: str, shots: int = 50) -> tuple[str, dict[str, Any]]:
    return (
        "submit_job",
        {"circuit": circuit(index), "backend": backend, "shots": shots, "idempotency_key": f"{tag}-{index}"},
    )


async def wait_until_terminal(site: Site, job_ids: Iterable[str], *, within_s: float) -> bool:
    wanted = set(job_ids)
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        jobs = site.jobs()
        if all(jobs.get(j, {}).get("state") in TERMINAL for j in wanted):
            return True
        await anyio.sleep(0.5)
    return False


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]
