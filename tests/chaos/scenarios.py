"""The chaos scenarios. Each takes a folder and a size and returns one row of the table.

`make chaos` runs them at full size (`FULL`); `tests/test_chaos.py` runs them at `SMALL` in
`make test` and asserts that nothing was lost, run twice, left reserved or spent over budget.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import anyio
from mcp import Client

from qpu_gateway.adapters.faulty import Mix

from ..support import http_client
from .harness import (
    JOB_PRICE_MICRO,
    Agent,
    Row,
    Server,
    Site,
    answer,
    circuit,
    percentile,
    settle_books,
    submit_call,
    wait_until_terminal,
)

RETRY_MAX_TRIES = 5  # Config.retry_max_tries: the cap every transient job must finish within


@dataclass(frozen=True)
class Size:
    crash_jobs: int
    crash_agents: int
    crash_kills: int
    fault_jobs: int
    breaker_jobs: int
    storm_calls: int
    budget_sessions: int
    budget_offers: int  # submits per session
    fuzz_calls: int


FULL = Size(500, 8, 5, 300, 12, 10_000, 4, 40, 10_000)
SMALL = Size(60, 4, 2, 60, 6, 400, 3, 25, 0)


# -- crash -----------------------------------------------------------------------------------------


async def crash(root: Path, size: Size, backend: str = "sqlite") -> Row:
    """Agents submit through two HTTP processes that are SIGKILLed and restarted under them."""
    site = Site(root / f"crash-{backend}", backend=backend)
    try:
        return await _crash(site, size)
    finally:
        site.close()


async def _crash(site: Site, size: Size) -> Row:
    on = "" if site.backend == "sqlite" else f", {site.backend}"
    row = Row(f"crash: SIGKILL x{size.crash_kills} (2 HTTP processes, {size.crash_agents} sessions{on})")
    site.write_policy()
    faults = "mix:price_usd=0.10,seed=1"  # a provider that never fails, and records what it ran
    servers = [Server(site, faults, f"server{i}") for i in range(2)]
    for server in servers:
        server.start()
    agents = [Agent(f"agent{i}", await site.key(f"agent{i}"), servers) for i in range(size.crash_agents)]
    shares = [size.crash_jobs // len(agents) + (i < size.crash_jobs % len(agents)) for i in range(len(agents))]
    per_agent = max(shares)
    kills: list[str] = []
    rng = random.Random(5)
    started = time.monotonic()

    async def monkey() -> None:
        for n in range(size.crash_kills):
            await anyio.sleep(rng.uniform(0.5, 2.5))
            if n == 0:
                # The window that matters most: the provider has the job, the gateway has not yet
                # saved that. The next process to accept a job kills itself right there.
                trigger = site.provider_dir / "kill-after-accept"
                trigger.touch()
                for _ in range(1200):  # up to a minute for a process to accept a job
                    if not trigger.exists():
                        break
                    await anyio.sleep(0.05)
                await anyio.sleep(0.2)
                dead = [s for s in servers if not s.alive]
                if not dead:
                    trigger.unlink(missing_ok=True)
                    kills.append("accept-window kill not reached")
                    continue
                kills.append("after accept, before save")
                await anyio.to_thread.run_sync(dead[0].start)
                continue
            victim = servers[n % len(servers)]
            victim.kill()
            kills.append(f"t={time.monotonic() - started:.1f}s")
            await anyio.to_thread.run_sync(victim.start)

    # Agents pace their submits so that work is still arriving and running while the kills land.
    pause_s = size.crash_kills * 2.0 / per_agent
    async with anyio.create_task_group() as tg:
        tg.start_soon(monkey)
        for i, agent in enumerate(agents):
            calls = [submit_call(i * per_agent + j, "faulty/qpu", tag=agent.name) for j in range(shares[i])]
            tg.start_soon(agent.run, calls, pause_s)
    admitted = {f"{a.name}/{k}": v for a in agents for k, v in a.admitted.items()}
    done = await wait_until_terminal(site, admitted.values(), within_s=120 + size.crash_jobs / 5)
    finished_at = time.monotonic() - started
    for server in servers:
        server.stop()
    row.check(done, "jobs still unfinished after the wait")
    row.check(len(admitted) == size.crash_jobs, f"{len(admitted)} of {size.crash_jobs} admitted")
    settle_books(site, row, admitted)
    jobs = site.jobs()
    states = Counter(job["state"] for job in jobs.values())
    row.check(len(jobs) == len(admitted), f"{len(jobs)} job rows for {len(admitted)} submits (duplicates)")
    row.check(states["succeeded"] == len(admitted), f"states {dict(states)}")
    row.check("after accept, before save" in kills, "no kill landed between provider accept and state save")
    [(absorbed,)] = site.provider_query("SELECT count(*) FROM calls WHERE outcome = 'duplicate'")
    reclaimed = sum(1 for job in jobs.values() if job["runs"] > 1)
    row.other = [
        f"kills {len(kills)} ({', '.join(kills)})",
        f"jobs reclaimed after a kill {reclaimed}",
        f"resubmits absorbed by the provider {absorbed}",
        f"agent reconnects {sum(a.reconnects for a in agents)}",
        f"committed ${site.committed_micro() / 1e6:.2f} = provider bill",
        f"all finished {finished_at:.0f} s",
    ]
    return row


# -- provider faults ---------------------------------------------------------------------------------


FAULT_MIX = "mix:transient=0.30,quota=0.05,permanent=0.05,slow=0.05,slow_s=4,transient_tries=3,seed=7,price_usd=0.10"


async def provider_faults(root: Path, size: Size) -> Row:
    """A provider answering 30% transient, 5% quota, 5% permanent and 5% very slow, via two stdio processes."""
    row = Row("provider faults: 30% transient, 5% quota, 5% permanent, 5% slow (2 stdio processes)")
    site = Site(root / "faults")
    # Every job must be admitted to see how each fault ends; a run of transient faults early on may
    # reach adaptive admission's error rate (50% of 10 calls), which would pace the submits instead.
    site.write_policy("\n[adaptive_admission]\nenabled = false\n")
    sessions = 2
    per_session = size.fault_jobs // sessions
    admitted: dict[str, str] = {}

    async def session(n: int) -> None:
        key = await site.key(f"faulty{n}")
        async with Client(site.stdio(key, FAULT_MIX)) as client:
            for j in range(per_session):
                name, args = submit_call(n * per_session + j, "faulty/qpu", tag=f"s{n}")
                body = answer(await client.call_tool(name, args))
                row.check("job_id" in body and "code" not in body, f"submit refused: {body}")
                admitted[f"s{n}-{j}"] = str(body.get("job_id"))
            # The server process runs the jobs; keep it (and the session) until they end.
            await wait_until_terminal(site, [admitted[f"s{n}-{j}"] for j in range(per_session)], within_s=300)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for n in range(sessions):
            tg.start_soon(session, n)
    settle_books(site, row, admitted)
    mix = Mix.parse(FAULT_MIX.removeprefix("mix:"))
    jobs = site.jobs()
    fates = {job_id: mix.fate(job_id)[0] for job_id in admitted.values()}
    expect = {
        "ok": "succeeded",
        "slow": "succeeded",
        "transient": "succeeded",
        "quota": "failed",
        "permanent": "failed",
    }
    codes = {"quota": "quota_exhausted", "permanent": "provider_error"}
    wrong = [
        (fate, jobs[j]["state"], jobs[j]["code"])
        for j, fate in fates.items()
        if jobs[j]["state"] != expect[fate] or (fate in codes and jobs[j]["code"] != codes[fate])
    ]
    row.check(not wrong, f"{len(wrong)} job(s) ended wrongly, e.g. {wrong[:3]}")
    calls = site.provider_query("SELECT job_id, at, outcome FROM calls ORDER BY id")
    by_job: dict[str, list[tuple[float, str]]] = {}
    for job_id, at, outcome in calls:
        by_job.setdefault(job_id, []).append((float(at), str(outcome)))
    transient_calls = [len(by_job.get(j, [])) for j, fate in fates.items() if fate == "transient"]
    most = max(transient_calls, default=0)
    row.check(most <= RETRY_MAX_TRIES, f"a transient job needed {most} provider calls (cap {RETRY_MAX_TRIES})")
    # Jitter: the wait between a transient failure and the same job's next call.
    waits = [
        later[0] - earlier[0]
        for history in by_job.values()
        for earlier, later in pairwise(history)
        if earlier[1] == "transient"
    ]
    first_waits = [
        history[1][0] - history[0][0]
        for history in by_job.values()
        if len(history) > 1 and history[0][1] == "transient"
    ]
    # A herd would show as many retries landing in the same instant: count the busiest 50 ms.
    buckets = Counter(int((history[1][0]) / 0.05) for history in by_job.values() if len(history) > 1)
    counted = Counter(fates.values())
    spent = site.committed_micro()
    succeeded = sum(1 for j in admitted.values() if jobs[j]["state"] == "succeeded")
    row.check(spent == succeeded * JOB_PRICE_MICRO, "committed differs from jobs run")
    row.other = [
        "fates " + ", ".join(f"{k} {counted[k]}" for k in ("ok", "transient", "quota", "permanent", "slow")),
        f"transient jobs all succeeded, at most {most} provider calls (cap {RETRY_MAX_TRIES})",
        f"retry waits p10/p50/p90 {percentile(first_waits, 10):.3f}/{percentile(first_waits, 50):.3f}/"
        f"{percentile(first_waits, 90):.3f} s after a 1st failure (full jitter on a 0.2 s base)",
        f"busiest 50 ms holds {max(buckets.values(), default=0)} of {len(waits)} retries",
        f"all finished {time.monotonic() - started:.0f} s",
    ]
    return row


# -- circuit breaker ---------------------------------------------------------------------------------


async def breaker(root: Path, size: Size) -> Row:
    """A backend down for a while: its breaker opens, jobs wait, a probe follows, it closes on recovery."""
    row = Row("circuit breaker: backend down, then back (1 HTTP process)")
    site = Site(root / "breaker")
    # This scenario submits all its jobs while the backend is down; pacing them is not what it tests.
    site.write_policy("\n[adaptive_admission]\nenabled = false\n")
    down = site.provider_dir / "down"
    down.touch()
    server = Server(site, "mix:price_usd=0.10,seed=3", "server")
    server.start()
    key = await site.key("alice")
    admitted: dict[str, str] = {}
    try:
        async with http_client(server.url, key) as client:

            async def breaker_state() -> str:
                listing = answer(await client.call_tool("list_backends", {}))
                entry = next(b for b in listing["backends"] if b["id"] == "faulty/qpu")
                return str(entry["breaker"])

            for j in range(size.breaker_jobs):
                name, args = submit_call(j, "faulty/qpu", tag="b")
                admitted[str(j)] = str(answer(await client.call_tool(name, args))["job_id"])
            opened = await _until(lambda: _is(breaker_state, "open"), within_s=60)
            row.check(opened, "the breaker never opened")
            [(failures_to_open,)] = site.provider_query("SELECT count(*) FROM calls")
            window_s = 6.0
            await anyio.sleep(window_s)  # the outage goes on: only probes may reach the provider
            [(calls_after,)] = site.provider_query("SELECT count(*) FROM calls")
            jobs = site.jobs()
            failed = [j for j in admitted.values() if jobs[j]["state"] == "failed"]
            waiting = sum(1 for j in admitted.values() if jobs[j]["state"] == "queued")
            row.check(not failed, f"{len(failed)} job(s) failed because of the outage")
            probes = calls_after - failures_to_open
            row.check(probes <= window_s / 2 + 2, f"{probes} provider calls in {window_s} s while open (spinning)")
            down.unlink()
            recovered_at = time.monotonic()
            closed = await _until(lambda: _is(breaker_state, "closed"), within_s=60)
            row.check(closed, "the breaker never closed after recovery")
            done = await wait_until_terminal(site, admitted.values(), within_s=120)
            row.check(done, "jobs unfinished after recovery")
            recovery_s = time.monotonic() - recovered_at
    finally:
        server.stop()
    settle_books(site, row, admitted)
    jobs = site.jobs()
    row.check(all(jobs[j]["state"] == "succeeded" for j in admitted.values()), "not every job succeeded")
    row.other = [
        f"opened after {failures_to_open} failed calls",
        f"{waiting} jobs waited queued, 0 failed",
        f"{probes} probe(s) in {window_s:.0f} s while open",
        f"closed and all done {recovery_s:.1f} s after recovery",
    ]
    return row


async def _is(read: Callable[[], Awaitable[str]], want: str) -> bool:
    return await read() == want


async def _until(check: Callable[[], Awaitable[bool]], *, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await anyio.sleep(0.1)
    return False


# -- storm -----------------------------------------------------------------------------------------

STORM_DEFAULTS = """
rate_limits = [
  { limit = "60/minute", per = "agent", tools = ["submit_job"] },
  { limit = "20/second", per = "agent", tools = ["*"] },
]
"""
STORM_POLICY = """
[agents.looper]
agent_quota = { cost_usd = { day = "1.00" } }
"""
STORM_BUDGET_MICRO = 1_000_000


async def storm(root: Path, size: Size) -> Row:
    """One agent loops submit_job as fast as it can while three others go about their work."""
    row = Row(f"storm: one agent, {size.storm_calls:,} submits as fast as it can (1 HTTP process)")
    site = Site(root / "storm")
    site.write_policy(STORM_POLICY, defaults=STORM_DEFAULTS)
    server = Server(site, "mix:price_usd=0.10,seed=4", "server")
    server.start()
    looper_key = await site.key("looper")
    other_keys = [await site.key(f"calm{i}") for i in range(3)]
    phase = {"name": "before"}
    latencies: dict[str, list[float]] = {"before": [], "during": []}
    answers: Counter[str] = Counter()
    storm_started = anyio.Event()
    storm_over = anyio.Event()

    async def calm(key: str, n: int) -> None:
        async with http_client(server.url, key) as client:
            i = 0
            while not storm_over.is_set():
                i += 1
                name, args = (
                    submit_call(n * 100_000 + i, "aer/simulator", tag=f"calm{n}")
                    if i % 20 == 0  # a submit every 2 s or so: well inside their own 60 a minute
                    else ("list_jobs", {"limit": 5})
                    if i % 2
                    else ("get_usage", {})
                )
                began = time.monotonic()
                body = answer(await client.call_tool(name, args))
                latencies[phase["name"]].append(time.monotonic() - began)
                row.check("code" not in body, f"a calm agent was refused: {body}")
                await anyio.sleep(0.05)

    async def looper() -> None:
        await anyio.sleep(3)  # the calm agents' baseline first
        phase["name"] = "during"
        storm_started.set()
        remaining = iter(range(size.storm_calls))
        stuck = {"circuit": circuit(1), "backend": "faulty/qpu", "shots": 50}  # the same call, again and again
        async with http_client(server.url, looper_key) as client:

            async def hammer() -> None:
                for _ in remaining:
                    body = answer(await client.call_tool("submit_job", stuck))
                    answers[body.get("code", "admitted")] += 1

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(hammer)
        storm_over.set()

    started = time.monotonic()
    try:
        async with anyio.create_task_group() as tg:
            for n, key in enumerate(other_keys):
                tg.start_soon(calm, key, n)
            tg.start_soon(looper)
        storm_s = time.monotonic() - started - 3
        looper_jobs = [r[0] for r in site.query("SELECT id FROM jobs WHERE agent = 'looper'")]
        done = await wait_until_terminal(site, [r[0] for r in site.query("SELECT id FROM jobs")], within_s=120)
        row.check(done, "jobs unfinished after the storm")
        await anyio.sleep(1)
    finally:
        server.stop()
    admitted = {str(n): job_id for n, job_id in enumerate(looper_jobs)}
    settle_books(site, row, admitted)
    spent = site.committed_micro("agent", "looper")
    row.over_budget_micro = max(0, spent - STORM_BUDGET_MICRO)
    row.check(row.over_budget_micro == 0, "the looping agent spent beyond its budget")
    # Its limits: 60 submits in any minute, and $1.00 a day at $0.10 a job.
    allowed = min(60 * (int(storm_s // 60) + 1), STORM_BUDGET_MICRO // JOB_PRICE_MICRO)
    row.check(answers["admitted"] <= allowed, f"{answers['admitted']} admitted, limit {allowed}")
    row.check(sum(answers.values()) == size.storm_calls, "not every storm call was answered")
    audited = site.query("SELECT count(*) FROM audit WHERE agent = 'looper' AND tool = 'submit_job'")[0][0]
    row.check(audited == size.storm_calls, f"{audited} audit rows for {size.storm_calls} calls")
    alerts = site.audit("agent.storm")
    row.check(any(a[1] == "looper" for a in alerts), "no storm alert in the audit")
    row.check(not any(a[1] != "looper" for a in alerts), "a calm agent was flagged as a storm")
    row.check("agent storm" in server.log_text(), "no storm alert in the log")
    before, during = latencies["before"], latencies["during"]
    refused = ", ".join(f"{code} {n:,}" for code, n in answers.most_common() if code != "admitted")
    row.other = [
        f"admitted {answers['admitted']} (limit {allowed}), refused {refused}",
        f"storm {size.storm_calls / storm_s:,.0f} calls/s for {storm_s:.0f} s",
        f"other agents' p50 {percentile(during, 50) * 1000:.0f} ms during (p90 {percentile(during, 90) * 1000:.0f}), "
        f"{percentile(before, 50) * 1000:.0f} ms before",
        f"storm alerts {len(alerts)} (audit and log)",
        f"audit rows = calls ({audited:,})",
    ]
    return row


# -- budget -----------------------------------------------------------------------------------------

BUDGET_POLICY = """
[projects.lab]
project_quota = { cost_usd = { day = "5.00" } }
"""
BUDGET_MICRO = 5_000_000


async def budget(root: Path, size: Size, backend: str = "sqlite") -> Row:
    """Agents of one project, each its own stdio server process, race to spend one budget."""
    site = Site(root / f"budget-{backend}", backend=backend)
    try:
        return await _budget(site, size)
    finally:
        site.close()


async def _budget(site: Site, size: Size) -> Row:
    on = "" if site.backend == "sqlite" else f" on {site.backend}"
    row = Row(f"budget: $5.00 a day shared by {size.budget_sessions} stdio processes{on}")
    site.write_policy(BUDGET_POLICY)
    faults = "mix:price_usd=0.10,seed=2"
    admitted: dict[str, str] = {}
    refused: Counter[str] = Counter()
    ready = {"n": 0}
    all_ready = anyio.Event()

    async def session(n: int) -> None:
        key = await site.key(f"lab{n}", project="lab")
        async with Client(site.stdio(key, faults)) as client:
            ready["n"] += 1
            if ready["n"] == size.budget_sessions:
                all_ready.set()
            await all_ready.wait()  # start the race together

            async def offer(j: int) -> None:
                name, args = submit_call(n * 1000 + j, "faulty/qpu", tag=f"lab{n}")
                body = answer(await client.call_tool(name, args))
                if "code" in body:
                    refused[str(body["code"])] += 1
                else:
                    admitted[f"{n}-{j}"] = str(body["job_id"])

            async with anyio.create_task_group() as tg:
                for j in range(size.budget_offers):
                    tg.start_soon(offer, j)
            await anyio.sleep(0.5)
            mine = [v for k, v in admitted.items() if k.startswith(f"{n}-")]
            await wait_until_terminal(site, mine, within_s=180)

    async with anyio.create_task_group() as tg:
        for n in range(size.budget_sessions):
            tg.start_soon(session, n)
    settle_books(site, row, admitted)
    spent = site.committed_micro("project", "lab")
    row.over_budget_micro = max(0, spent - BUDGET_MICRO)
    offered = size.budget_sessions * size.budget_offers
    expected = min(offered, BUDGET_MICRO // JOB_PRICE_MICRO)
    row.check(len(admitted) == expected, f"{len(admitted)} admitted, expected exactly {expected}")
    row.check(spent == len(admitted) * JOB_PRICE_MICRO, f"committed ${spent / 1e6:.2f}")
    row.check(set(refused) <= {"quota_exhausted"}, f"refusals {dict(refused)}")
    row.other = [
        f"offered {offered}, admitted {len(admitted)}, quota_exhausted {refused['quota_exhausted']}",
        f"committed ${spent / 1e6:.2f} of $5.00",
    ]
    return row


# -- database trouble -------------------------------------------------------------------------------

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process takes the database's write lock and holds it."""
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None
    assert locker.stdout.readline().strip() == "locked"
    return locker


def _mount(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False)
    return done.returncode == 0


def _remount(path: Path, options: str) -> bool:
    done = subprocess.run(["mount", "-o", f"remount,{options}", str(path)], capture_output=True, check=False)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


async def database(root: Path, size: Size) -> Row:
    """A locked database, a full disk and a read-only disk: clear errors, retries, nothing half-written."""
    row = Row("database trouble: locked, full disk, read-only disk (1 HTTP process)")
    admitted: dict[str, str] = {}
    figures: list[str] = []
    await _locked(root / "locked", row, admitted, figures)
    mount = root / "disk"
    if _mount(mount, "size=24m"):
        try:
            await _full_and_read_only(mount, root / "disk-provider", row, figures)
        finally:
            _umount(mount)
    else:
        figures.append("full/read-only disk skipped: mounting a tmpfs needs root")
    row.other = figures
    return row


async def _locked(path: Path, row: Row, admitted: dict[str, str], figures: list[str]) -> None:
    site = Site(path)
    site.write_policy()
    server = Server(site, "mix:price_usd=0.10,seed=6", "server")
    server.start()
    key = await site.key("alice")
    unavailable = 0
    try:
        async with http_client(server.url, key) as client:
            # A short hold: the gateway waits for the lock (SQLite's busy timeout) and answers.
            locker = hold_lock(site.db, 1.0)
            began = time.monotonic()
            for j in range(3):
                name, args = submit_call(j, "faulty/qpu", tag="short")
                body = answer(await client.call_tool(name, args))
                row.check("code" not in body, f"refused during a short lock: {body}")
                admitted[f"short-{j}"] = str(body.get("job_id"))
            waited = time.monotonic() - began
            locker.wait()
            # A hold longer than the busy timeout (2 s here): `unavailable` with retry_after_s, then the same
            # submits again (same idempotency keys) once it is gone.
            locker = hold_lock(site.db, 7.0)
            pending = [submit_call(j, "faulty/qpu", tag="long") for j in range(3)]
            for name, args in pending:
                body = answer(await client.call_tool(name, args))
                if body.get("code") == "unavailable":
                    unavailable += 1
                    row.check(body.get("retry_after_s") is not None, "unavailable without retry_after_s")
                else:
                    row.check("code" not in body, f"unexpected refusal: {body}")
            locker.wait()
            for name, args in pending:
                body = answer(await client.call_tool(name, args))
                row.check("code" not in body, f"refused after the lock: {body}")
                admitted[f"long-{args['idempotency_key']}"] = str(body.get("job_id"))
            done = await wait_until_terminal(site, admitted.values(), within_s=60)
            row.check(done, "jobs unfinished after the locks")
            await anyio.sleep(6)  # the set-aside audit rows are written within a sweep
    finally:
        server.stop()
    settle_books(site, row, admitted)
    logged = site.query("SELECT count(*) FROM audit WHERE error_code = 'unavailable'")[0][0]
    row.check(unavailable >= 1, "a 7 s lock never surfaced as `unavailable`")
    row.check(logged == unavailable, f"{logged} audit rows for {unavailable} unavailable answers")
    ok, report = site.audit_verify()
    row.check(ok, f"audit chain: {report}")
    row.jobs += len(admitted)
    figures.append(f"locked 1 s: 3/3 answered after waiting {waited:.1f} s")
    figures.append(f"locked 7 s: {unavailable}/3 answered `unavailable`, all admitted once on retry")


async def _full_and_read_only(mount: Path, provider_root: Path, row: Row, figures: list[str]) -> None:
    site = Site(mount / "site", provider_root=provider_root)
    site.write_policy()
    server = Server(site, "mix:price_usd=0.10,seed=8", "server", log_dir=provider_root)
    server.start()
    key = await site.key("alice")
    admitted: dict[str, str] = {}
    filler = mount / "filler"
    full_answers: Counter[str] = Counter()
    try:
        async with http_client(server.url, key) as client:
            for j in range(3):
                name, args = submit_call(j, "faulty/qpu", tag="before")
                admitted[f"before-{j}"] = str(answer(await client.call_tool(name, args))["job_id"])
            await wait_until_terminal(site, admitted.values(), within_s=60)
            _fill(filler)
            pending = [submit_call(j, "faulty/qpu", tag="full") for j in range(3)]
            for name, args in pending:
                body = answer(await client.call_tool(name, args))
                full_answers[str(body.get("code", "admitted"))] += 1
                if "code" not in body:
                    admitted[f"full-{j}"] = str(body["job_id"])
            read = answer(await client.call_tool("get_job", {"job_id": admitted["before-0"]}))
            row.check(read.get("state") == "succeeded", f"reads failed on a full disk: {read}")
            filler.unlink()
            for name, args in pending:
                body = answer(await client.call_tool(name, args))
                row.check("code" not in body, f"refused after space was freed: {body}")
                admitted[f"full-{args['idempotency_key']}"] = str(body.get("job_id"))
            done = await wait_until_terminal(site, admitted.values(), within_s=60)
            row.check(done, "jobs unfinished after the disk was freed")
            await anyio.sleep(6)
    finally:
        filler.unlink(missing_ok=True)
        server.stop()
    row.check(full_answers["unavailable"] >= 1, f"a full disk gave {dict(full_answers)}")
    settle_books(site, row, admitted)
    ok, report = site.audit_verify()
    row.check(ok, f"audit chain after a full disk: {report}")
    row.jobs += len(admitted)
    figures.append(
        f"disk full: {full_answers['unavailable']}/3 submits `unavailable`, reads served, all admitted after"
    )

    # A read-only disk: the gateway refuses to start, saying why, and the data is intact after.
    jobs_before = site.jobs()
    row.check(_remount(mount, "ro"), "could not remount the disk read-only")
    began = time.monotonic()
    with anyio.fail_after(120):
        refused = await anyio.run_process(
            [sys.executable, *site.serve_args("http", 1)], env={**os.environ, **site.env(None)}, check=False
        )
    stderr = refused.stderr.decode(errors="replace")
    took = time.monotonic() - began
    row.check(refused.returncode != 0, "serve started on a read-only disk")
    row.check("read-only" in stderr, f"serve's error does not say read-only: {stderr[-400:]}")
    row.check(_remount(mount, "rw"), "could not remount the disk writable")
    row.check(site.jobs() == jobs_before, "the read-only start changed the database")
    figures.append(f"read-only disk: serve refused in {took:.1f} s saying 'read-only', data intact")


def _fill(path: Path) -> None:
    """Write until the disk is full, in smaller and smaller pieces."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for piece in (1 << 20, 1 << 12, 1 << 9):
            with suppress(OSError):
                while True:
                    os.write(fd, b"\0" * piece)
    finally:
        os.close(fd)


# -- hostile input -----------------------------------------------------------------------------------


def fuzz(root: Path, size: Size) -> Row:
    """The Hypothesis fuzz of every tool (tests/test_hostile_input.py) at `fuzz_calls` calls."""
    row = Row(f"hostile input: {size.fuzz_calls:,} fuzzed calls (in-memory sessions, both eras)")
    log = root / "fuzz.log"
    root.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hostile_input.py", "-k", "fuzzed"],
        env={
            **os.environ,
            "QPU_FUZZ_EXAMPLES": str(size.fuzz_calls // 2),  # per era, two eras
            "QPU_FUZZ_MAX_BYTES": str(10 * 1024 * 1024),
            "QPU_FUZZ_LOG": str(log),
        },
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = log.read_text().split() if log.exists() else []
    took = [float(t) for t in lines]
    row.check(done.returncode == 0, "fuzz failures:\n" + done.stdout[-3000:])
    row.check(len(lines) >= size.fuzz_calls, f"only {len(lines)} fuzzed calls made")
    row.other = [
        f"fuzzed tool calls {len(lines):,}, failures {0 if done.returncode == 0 else 'see above'}",
        f"slowest call {max(took, default=0):.2f} s, p99 {percentile(took, 99) * 1000:.0f} ms",
        f"took {time.monotonic() - began:.0f} s",
    ]
    return row


SCENARIOS: dict[str, Callable[[Path, Size], Awaitable[Row]]] = {
    "crash": crash,
    "faults": provider_faults,
    "breaker": breaker,
    "storm": storm,
    "budget": budget,
    "database": database,
    # The scenarios that test the store across processes, again on PostgreSQL: SIGKILLed replicas
    # (leases, reclaims, no job run twice) and one budget raced by several processes (exact).
    # The others are about providers, the policy or the SQLite file itself.
    "crash-postgresql": functools.partial(crash, backend="postgresql"),
    "budget-postgresql": functools.partial(budget, backend="postgresql"),
}


def json_rows(rows: list[Row]) -> str:
    return json.dumps([row.as_dict() for row in rows], indent=1)


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


__all__ = ["FULL", "SCENARIOS", "SMALL", "Size", "clean", "fuzz", "json_rows"]
