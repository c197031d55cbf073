"""What holds across gateway replicas on one PostgreSQL database: each test runs at least three
`qpu-gateway serve` processes (Streamable HTTP) on one fresh database and reads the books back.

Most tests share one cluster (module-scoped; each uses agents of its own, so they do not disturb
each other): three replicas r0..r2 that run the fault-injecting `faulty/qpu` backend against one
fake provider (whose books, shared by every process, say what it ran), and a fourth, the watcher,
which cannot run `faulty/qpu` jobs and polls only once an hour, so whatever it learns of those jobs
it learns by LISTEN/NOTIFY. A replica SIGKILLed mid-run, and PostgreSQL itself restarted mid-load
(a throwaway server of the test's own, never the shared one on 5432), each get a cluster of their own.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ResourceUpdated
from mcp.shared.exceptions import MCPError
from mcp_types import ResourceUpdatedNotification

from qpu_gateway.config import Database
from qpu_gateway.jobs.approvals import approve
from qpu_gateway.jobs.states import TERMINAL
from qpu_gateway.store import open_store

from .databases import REDIS_STORAGE, create_postgres, drop_postgres, query
from .support import BELL2, body, free_port, gateway_cmd, http_client, new_key, set_up_database, stop_process
from .support import wait_listening as wait_until_listening
from .test_postgres import Throwaway, throwaway  # noqa: F401  (the fixture: a PostgreSQL server of the test's own)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

FAULTY = "faulty/qpu"
PRICE_MICRO = 100_000  # the policy's price of a faulty/qpu job, and what the fake provider bills for one
# Every submit waits 0.2 s before the provider accepts it, so jobs overlap and queues form.
SLOW_PROVIDER = "mix:slow=1,slow_s=0.2,price_usd=0.10,seed=13"
POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }

[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "0.10"
per_shot_usd = "0"
source = "tests: a round price, the same as the fake provider bills"

[agents.budgeted]
agent_quota = { cost_usd = { day = "5.00" } }

[agents.watched]
confirm_above_usd = "0.05"

[projects.lab]
project_quota = { running_jobs = 3 }

[agents.lab-a]
agent_quota = { running_jobs = 1 }
"""


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


# -- a cluster of replicas ---------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Cluster:
    """Replicas of `qpu-gateway serve` on one database, one policy and one fake provider."""

    root: Path
    database: Database
    replicas: list[Replica] = field(default_factory=list)

    @property
    def policy(self) -> Path:
        return self.root / "policy.toml"

    @property
    def provider_dir(self) -> Path:
        return self.root / "provider"

    def env(self, faults: str | None, **more: str) -> dict[str, str]:
        env = {
            **os.environ,
            "QPU_GATEWAY_LEASE_S": "3",
            "QPU_GATEWAY_POLL_S": "0.2",
            "QPU_GATEWAY_RETRY_BASE_S": "0.05",
            "QPU_GATEWAY_RATE_STORAGE": REDIS_STORAGE,
            "QPU_GATEWAY_FAULTS_DIR": str(self.provider_dir),
            **more,
        }
        env.pop("QPU_GATEWAY_FAULTS", None)
        if faults is not None:
            env["QPU_GATEWAY_FAULTS"] = faults
        return env

    def start(self, names: list[str], faults: str | None, **more: str) -> list[Replica]:
        """Start one replica per name, side by side; each logs to ROOT/NAME.log."""
        set_up_database(self.database)

        def one(name: str) -> Replica:
            port = free_port()
            with (self.root / f"{name}.log").open("ab") as log:
                process = subprocess.Popen(
                    gateway_cmd(
                        "serve",
                        "--transport",
                        "http",
                        "--port",
                        str(port),
                        "--db",
                        self.database.url or "",
                        "--policy",
                        str(self.policy),
                        "--log-level",
                        "warning",
                    ),
                    env=self.env(faults, **more),
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            wait_until_listening(process, port, what=f"replica {name} (log: {self.root / name}.log)", within_s=60)
            return Replica(name, port, process)

        with ThreadPoolExecutor(len(names)) as pool:
            started = list(pool.map(one, names))
        self.replicas += started
        return started

    def stop(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.replicas))) as pool:
            list(pool.map(lambda r: stop_process(r.process, grace_s=10), self.replicas))

    def __getitem__(self, name: str) -> Replica:
        (replica,) = [r for r in self.replicas if r.name == name]
        return replica

    # -- the books --

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return query(self.database, sql, params)

    def provider_runs(self) -> Counter[str]:
        """How many times the fake provider ran each job (accepted and executed it)."""
        with closing(sqlite3.connect(self.provider_dir / "provider.db", timeout=30)) as db:
            return Counter(job_id for (job_id,) in db.execute("SELECT job_id FROM runs"))

    def claims(self) -> list[tuple[int, str, str, str]]:
        """Every claim in audit order: (seq, job id, agent, the claiming replica's pid)."""
        rows = self.rows("SELECT seq, job_id, agent, detail FROM audit WHERE tool = 'job.claimed' ORDER BY seq")
        return [(seq, job_id, agent, detail.split(":")[1]) for seq, job_id, agent, detail in rows]

    def reserved_micro(self) -> int:
        [(total,)] = self.rows("SELECT coalesce(sum(cost_micro_usd), 0) FROM ledger WHERE status = 'reserved'")
        return int(total)

    def audit_verify(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            gateway_cmd("audit", "verify", "--db", self.database.url or "", "--policy", str(self.policy)),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    async def finished(self, job_ids: list[str], *, within_s: float = 120) -> dict[str, str]:
        """Wait until every job is terminal (read straight from the database); their states."""
        with anyio.fail_after(within_s):
            while True:
                rows = await anyio.to_thread.run_sync(
                    lambda: self.rows("SELECT id, state FROM jobs WHERE id = ANY(?)", (job_ids,))
                )
                states = dict(rows)
                if len(states) == len(set(job_ids)) and all(s in {t.value for t in TERMINAL} for s in states.values()):
                    return states
                await anyio.sleep(0.2)


def new_cluster(root: Path, database: Database) -> Cluster:
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, database)
    cluster.policy.write_text(POLICY, encoding="utf-8")
    cluster.provider_dir.mkdir(exist_ok=True)
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """r0..r2 run `faulty/qpu` jobs; the watcher runs none of them and polls once an hour."""
    url = create_postgres("qpg_replicas")
    cluster = new_cluster(tmp_path_factory.mktemp("replicas"), Database(url=url))
    try:
        cluster.start(["r0", "r1", "r2"], SLOW_PROVIDER)
        cluster.start(["watcher"], None, QPU_GATEWAY_POLL_S="3600")
        yield cluster
    finally:
        cluster.stop()
        drop_postgres(url)


async def key_for(cluster: Cluster, agent: str, project: str = "default") -> str:
    return await new_key(cluster.database, agent, project=project)


async def fire(url: str, key: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Submit every call at once through one real HTTP session; their answers' bodies."""
    answers: list[dict[str, Any]] = []
    async with http_client(url, key) as client:

        async def one(args: dict[str, Any]) -> None:
            result = await client.call_tool("submit_job", args)
            answers.append({"error": result.is_error, **body(result)})

        async with anyio.create_task_group() as tg:
            for args in calls:
                tg.start_soon(one, args)
    return answers


def job(**more: Any) -> dict[str, Any]:
    return {"circuit": BELL2, "backend": FAULTY, "shots": 10, **more}


# -- budgets -------------------------------------------------------------------------------------------


async def test_200_concurrent_submits_over_three_replicas_at_a_budget_for_50_admit_exactly_50(
    cluster: Cluster,
) -> None:
    key = await key_for(cluster, "budgeted")  # $5.00 a day at $0.10 a job: 50 jobs
    runners = [cluster[name] for name in ("r0", "r1", "r2")]
    answers: list[dict[str, Any]] = []

    async def session(url: str, count: int) -> None:
        answers.extend(await fire(url, key, [job() for _ in range(count)]))

    async with anyio.create_task_group() as tg:
        for n in range(6):  # two sessions per replica, 200 submits in all
            tg.start_soon(session, runners[n % 3].url, 34 if n < 2 else 33)
    assert len(answers) == 200
    assert Counter(a.get("code", "ok") for a in answers) == {"ok": 50, "quota_exhausted": 150}
    admitted = [a["job_id"] for a in answers if not a["error"]]
    states = await cluster.finished(admitted)
    assert Counter(states.values()) == {"succeeded": 50}
    runs = cluster.provider_runs()
    assert all(runs[j] == 1 for j in admitted)  # each ran once at the provider
    [(committed,)] = cluster.rows(
        "SELECT coalesce(sum(cost_micro_usd), 0) FROM ledger WHERE agent = 'budgeted' AND status = 'committed'"
    )
    [(reserved,)] = cluster.rows("SELECT count(*) FROM ledger WHERE agent = 'budgeted' AND status = 'reserved'")
    assert committed == 50 * PRICE_MICRO == 5_000_000 and reserved == 0
    claimed_by = {pid for _, job_id, _, pid in cluster.claims() if job_id in admitted}
    assert claimed_by <= {str(r.pid) for r in runners} and len(claimed_by) >= 2


# -- each job runs once -----------------------------------------------------------------------------------


async def test_one_idempotency_key_sent_to_every_replica_at_once_makes_one_job(cluster: Cluster) -> None:
    key = await key_for(cluster, "retrier")
    runners = [cluster[name] for name in ("r0", "r1", "r2")]
    answers: list[list[dict[str, Any]]] = []
    async with (
        http_client(runners[0].url, key) as c0,
        http_client(runners[1].url, key) as c1,
        http_client(runners[2].url, key) as c2,
    ):

        async def send(client: Client, idempotency_key: str, into: list[dict[str, Any]]) -> None:
            into.append(body(await client.call_tool("submit_job", job(idempotency_key=idempotency_key))))

        for n in range(10):  # ten keys, each sent to the three replicas at the same moment
            round_answers: list[dict[str, Any]] = []
            async with anyio.create_task_group() as tg:
                for client in (c0, c1, c2):
                    tg.start_soon(send, client, f"exp-{n}", round_answers)
            answers.append(round_answers)
    for round_answers in answers:
        assert len({a["job_id"] for a in round_answers}) == 1  # the same job, whichever replica answered
        assert sorted(a["idempotent_replay"] for a in round_answers) == [False, True, True]
    rows = cluster.rows("SELECT idempotency_key, count(*) FROM jobs WHERE agent = 'retrier' GROUP BY idempotency_key")
    assert dict(rows) == {f"exp-{n}": 1 for n in range(10)}
    ids = [a[0]["job_id"] for a in answers]
    assert Counter((await cluster.finished(ids)).values()) == {"succeeded": 10}
    runs = cluster.provider_runs()
    assert all(runs[j] == 1 for j in ids)


async def test_agents_take_turns_across_replicas_and_each_job_is_claimed_once(cluster: Cluster) -> None:
    hog, polite = await key_for(cluster, "hog"), await key_for(cluster, "polite")
    polite_ids: list[str] = []
    async with http_client(cluster["r1"].url, polite) as polite_session:
        hogs = await fire(cluster["r0"].url, hog, [job(name=f"hog-{n}") for n in range(80)])

        async def one(n: int) -> None:
            polite_ids.append(body(await polite_session.call_tool("submit_job", job(name=f"polite-{n}")))["job_id"])

        async with anyio.create_task_group() as tg:  # once all of hog's are queued
            for n in range(3):
                tg.start_soon(one, n)
    hog_ids = [a["job_id"] for a in hogs]
    states = await cluster.finished(hog_ids + polite_ids)
    assert Counter(states.values()) == {"succeeded": 83}

    claims = [c for c in cluster.claims() if c[2] in ("hog", "polite")]
    twice = sorted(j for j, n in Counter(job_id for _, job_id, _, _ in claims).items() if n > 1)
    # A second claim is a lease that lapsed (a replica stalled over lease_s): its rows say which run.
    history = [cluster.rows("SELECT at, tool, detail FROM audit WHERE job_id = %s ORDER BY seq", (j,)) for j in twice]
    assert not twice, history
    assert Counter(job_id for _, job_id, _, _ in claims) == dict.fromkeys(hog_ids + polite_ids, 1)
    runs = cluster.provider_runs()
    assert all(runs[j] == 1 for j in hog_ids + polite_ids)
    replicas = {str(cluster[n].pid) for n in ("r0", "r1", "r2")}
    assert {pid for *_, pid in claims} <= replicas and len({pid for *_, pid in claims}) >= 2  # shared out
    # Order by the audit chain (one sequence across replicas): when polite's jobs were queued, many
    # of hog's were still waiting; first in, first out would run all of those first. Taking turns,
    # polite's jobs go out among the next few claims, whichever replica makes them.
    [(queued_at,)] = cluster.rows(
        "SELECT min(seq) FROM audit WHERE tool = 'submit_job' AND agent = 'polite' AND decision = 'ok'"
    )
    waiting_hogs = [c for c in claims if c[2] == "hog" and c[0] > queued_at]
    last_polite = max(c[0] for c in claims if c[2] == "polite")
    hogs_before_polite_done = [c for c in waiting_hogs if c[0] < last_polite]
    assert len(waiting_hogs) >= 12  # hog had 80 in: a queue to jump (14 of 40 were left once, under load)
    assert len(hogs_before_polite_done) <= 9, (len(waiting_hogs), len(hogs_before_polite_done))


async def test_running_caps_hold_across_replicas(cluster: Cluster) -> None:
    # lab-a may run one job at a time; the lab project (lab-a, lab-b, lab-c) three, one more than a
    # replica runs of a backend at once: reaching it takes two replicas running lab's jobs together.
    keys = {agent: await key_for(cluster, agent, project="lab") for agent in ("lab-a", "lab-b", "lab-c")}
    ids: list[str] = []

    async def submit(agent: str, replica: str) -> None:
        answers = await fire(cluster[replica].url, keys[agent], [job(name=f"{agent}-{n}") for n in range(4)])
        assert not any(a["error"] for a in answers), answers
        ids.extend(a["job_id"] for a in answers)

    async with anyio.create_task_group() as tg:
        for agent, replica in (("lab-a", "r0"), ("lab-b", "r1"), ("lab-c", "r2")):
            tg.start_soon(submit, agent, replica)
    assert Counter((await cluster.finished(ids)).values()) == {"succeeded": 12}

    # Replay the audit chain: a claim starts a run, the job's end stops it. A claimer counts the
    # running jobs after the end of any job it could replace has committed, so in chain order the
    # count never passes the cap unless a claim broke it.
    rows = cluster.rows(
        "SELECT seq, tool, agent, detail FROM audit WHERE job_id = ANY(?) "
        "AND (tool = 'job.claimed' OR tool = 'job.succeeded') ORDER BY seq",
        (ids,),
    )
    running: Counter[str] = Counter()
    most: Counter[str] = Counter()
    claimers: set[str] = set()
    for _, tool, agent, detail in rows:
        step = 1 if tool == "job.claimed" else -1
        if step == 1:
            claimers.add(detail.split(":")[1])
        for who in (agent, "lab"):
            running[who] += step
            most[who] = max(most[who], running[who])
    assert most["lab-a"] == 1 and most["lab"] == 3  # each cap reached, never passed
    assert len(claimers) >= 2


# -- job changes, pushed ------------------------------------------------------------------------------------


@asynccontextmanager
async def legacy_subscriber(url: str, key: str, heard: Callable[[str], None]) -> AsyncIterator[Client]:
    """A 2025-11-25 session over HTTP that tells `heard` of each `notifications/resources/updated`."""

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            heard(message.params.uri)

    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), mode="legacy", message_handler=on_message) as client,
    ):
        yield client


async def test_a_job_another_replica_ran_reaches_waiters_and_subscribers_on_the_watcher_by_notification(
    cluster: Cluster,
) -> None:
    """The watcher cannot run faulty/qpu jobs and polls once an hour: every change of this job is
    made by another process (the operator's approval here, a runner's claim and result), so a waiter
    or subscriber there can only hear of it through LISTEN/NOTIFY."""
    key = await key_for(cluster, "watched")  # every job of watched waits for an operator's approval
    watcher = cluster["watcher"]
    async with http_client(cluster["r1"].url, key) as runner:
        held = body(await runner.call_tool("submit_job", job()))
    assert held["code"] == "approval_required"
    job_id, uri = held["job_id"], f"qpu://jobs/{held['job_id']}"

    legacy_updates: list[str] = []
    listened: list[str] = []
    progress: list[str] = []
    waited: dict[str, Any] = {}

    waiting = anyio.Event()
    all_heard = anyio.Event()

    async def on_progress(progress_made: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")
        waiting.set()  # the waiter has read the job and is waiting

    def heard(uri: str) -> None:
        legacy_updates.append(uri)
        if len(legacy_updates) >= 4:
            all_heard.set()

    async with (
        http_client(watcher.url, key, mode="2026-07-28") as modern,
        legacy_subscriber(watcher.url, key, heard) as legacy,
    ):
        await legacy.subscribe_resource(uri)
        async with modern.listen(resource_subscriptions=[uri]) as subscription:

            async def listen() -> None:
                async for event in subscription:
                    if isinstance(event, ResourceUpdated):
                        listened.append(event.uri)
                        view = body(await modern.call_tool("get_job", {"job_id": job_id}))
                        if view["terminal"]:
                            return

            async def wait() -> None:
                done = await modern.call_tool(
                    "wait_for_job", {"job_id": job_id, "timeout_s": 120}, progress_callback=on_progress
                )
                waited.update(body(done))

            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                tg.start_soon(listen)
                with anyio.fail_after(30):
                    await waiting.wait()
                store = await open_store(cluster.database)  # the operator, a process of its own
                try:
                    await approve(store, job_id, by="ops")
                finally:
                    await store.close()
        with anyio.fail_after(30):  # the session's notifications may trail the tool results
            await all_heard.wait()

    assert waited["state"] == "succeeded"
    assert "pending_approval" in progress[0] and progress[-1].endswith("succeeded")
    assert listened and set(listened) == {uri}
    # approved (queued), claimed (submitting), at the provider (running), succeeded: a 2025-era
    # subscriber hears of each change, every one of them made by another process
    assert legacy_updates == [uri] * 4
    [(claimer,)] = cluster.rows("SELECT detail FROM audit WHERE job_id = ? AND tool = 'job.claimed'", (job_id,))
    assert claimer.split(":")[1] in {str(cluster[n].pid) for n in ("r0", "r1", "r2")}


# -- one audit chain --------------------------------------------------------------------------------------


async def test_one_audit_chain_takes_concurrent_appends_from_every_replica_and_verifies(cluster: Cluster) -> None:
    names = ["r0", "r1", "r2", "watcher"]
    keys = {name: await key_for(cluster, f"audit-{name}") for name in names}
    [(before,)] = cluster.rows("SELECT coalesce(max(seq), 0) FROM audit")

    async def calls(name: str) -> None:
        async with http_client(cluster[name].url, keys[name]) as client, anyio.create_task_group() as tg:
            for _ in range(30):
                tg.start_soon(client.call_tool, "get_usage", {})
            for n in range(5):
                tg.start_soon(client.call_tool, "submit_job", {"circuit": BELL2, "shots": 10 + n})  # aer: anyone's

    async with anyio.create_task_group() as tg:
        for name in names:
            tg.start_soon(calls, name)
    rows = cluster.rows(
        "SELECT seq, agent FROM audit WHERE seq > ? AND agent = ANY(?) AND tool IN ('get_usage', 'submit_job') "
        "ORDER BY seq",
        (before, [f"audit-{n}" for n in names]),
    )
    assert Counter(agent for _, agent in rows) == {f"audit-{n}": 35 for n in names}  # each call, one row
    switches = sum(1 for (_, a), (_, b) in itertools.pairwise(rows) if a != b)
    assert switches > 2 * len(names)  # the replicas' rows interleave in the one chain
    [(count, first, last)] = cluster.rows("SELECT count(*), min(seq), max(seq) FROM audit")
    assert (first, last) == (1, count)  # no gaps: every append took the next seq
    verified = cluster.audit_verify()  # the whole module's chain: claims, results, refusals, approvals
    assert verified.returncode == 0, verified.stdout + verified.stderr


# -- a replica killed mid-run --------------------------------------------------------------------------------


async def test_a_job_whose_replica_is_sigkilled_mid_run_completes_once_on_another(tmp_path: Path) -> None:
    url = create_postgres("qpg_replicas")
    cluster = new_cluster(tmp_path, Database(url=url))
    try:
        # Each replica's first job is held at the provider for 6 s: running there when the kill lands.
        cluster.start(["k0", "k1", "k2"], "hold:6")
        key = await key_for(cluster, "victim")
        async with http_client(cluster["k0"].url, key) as client:
            job_id = body(await client.call_tool("submit_job", job()))["job_id"]

        async def running_owner() -> str:
            with anyio.fail_after(30):
                while True:
                    rows = cluster.rows("SELECT state, lease_owner FROM jobs WHERE id = ?", (job_id,))
                    if rows and rows[0][0] == "running":
                        return str(rows[0][1])
                    await anyio.sleep(0.05)

        owner = await running_owner()
        (doomed,) = [r for r in cluster.replicas if f":{r.pid}:" in owner]
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=10)

        states = await cluster.finished([job_id], within_s=60)
        assert states == {job_id: "succeeded"}
        claims = [c for c in cluster.claims() if c[1] == job_id]
        assert claims[0][3] == str(doomed.pid)
        assert len(claims) == 2 and claims[1][3] != str(doomed.pid)  # reclaimed by a live replica once
        assert cluster.provider_runs()[job_id] == 1  # the provider ran it once: polled, not resubmitted
        [(runs, result)] = cluster.rows("SELECT runs, result FROM jobs WHERE id = ?", (job_id,))
        assert runs == 2 and json.loads(result)
        assert cluster.rows("SELECT count(*) FROM audit WHERE tool = 'job.handed_back'") == [(0,)]
        assert cluster.reserved_micro() == 0
    finally:
        cluster.stop()
        drop_postgres(url)


# -- PostgreSQL restarted mid-load ----------------------------------------------------------------------------


def raw_call(url: str, key: str) -> httpx2.Response:
    """One `tools/call` POSTed as any HTTP client would, to read the status and headers of the answer."""
    request = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "list_jobs", "arguments": {}}}
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json, text/event-stream"}
    return httpx2.post(url, json=request, headers=headers, timeout=30)


async def test_postgresql_restarted_mid_load_answers_unavailable_then_every_admitted_job_completes_once(
    throwaway: Throwaway,  # noqa: F811  (the fixture, imported above)
    tmp_path: Path,
) -> None:
    cluster = new_cluster(tmp_path, Database(url=throwaway.url))
    try:
        cluster.start(["p0", "p1", "p2"], SLOW_PROVIDER, QPU_GATEWAY_BUSY_TIMEOUT_S="1")
        agents = {f"careful-{n}": await key_for(cluster, f"careful-{n}") for n in range(3)}
        per_agent = 10
        admitted: dict[str, str] = {}  # idempotency key -> job id
        refused_while_down: list[dict[str, Any]] = []
        told_to_wait: list[float] = []  # retry_after_s of each unavailable answer the agents got
        six_admitted, up = anyio.Event(), anyio.Event()

        async def careful(agent: str, replica: Replica) -> None:
            """Submits in turn, each with its own idempotency key, repeating a submit that was not
            answered with a job (unavailable, or its connection broke) until it is."""
            for n in range(per_agent):
                idempotency_key = f"{agent}-{n}"
                while idempotency_key not in admitted:
                    try:
                        async with http_client(replica.url, agents[agent]) as client:
                            answer = body(await client.call_tool("submit_job", job(idempotency_key=idempotency_key)))
                    except MCPError as exc:  # the replica's HTTP answer while the database is down
                        answer = dict(exc.error.data or {})
                    except Exception:  # the call got no answer: repeat it (the key makes that safe)
                        await anyio.sleep(0.2)
                        continue
                    if "job_id" in answer and "code" not in answer:
                        admitted[idempotency_key] = answer["job_id"]
                        if len(admitted) >= 6:
                            six_admitted.set()
                    else:
                        assert answer["code"] == "unavailable", answer
                        told_to_wait.append(float(answer["retry_after_s"]))
                        await anyio.sleep(min(told_to_wait[-1], 0.5))
                if n == 3:
                    await up.wait()  # the rest once the server is back, so load spans the restart

        async def restart() -> None:
            await six_admitted.wait()
            async with AsyncExitStack() as stack:
                sessions = [
                    await stack.enter_async_context(http_client(r.url, agents["careful-0"])) for r in cluster.replicas
                ]
                await anyio.to_thread.run_sync(throwaway.stop)

                async def refused(replica: Replica, session: Client) -> None:
                    with pytest.raises(MCPError) as raised:  # an open session's call
                        await session.call_tool("list_jobs", {})
                    refused_while_down.append(dict(raised.value.error.data or {}))
                    raw = await anyio.to_thread.run_sync(lambda: raw_call(replica.url, agents["careful-0"]))
                    assert raw.status_code == 503 and int(raw.headers["retry-after"]) >= 1  # and as HTTP says it
                    refused_while_down.append(raw.json()["error"]["data"])

                async with anyio.create_task_group() as tg:  # each replica, while the server is down
                    for replica, session in zip(cluster.replicas, sessions, strict=True):
                        tg.start_soon(refused, replica, session)
            await anyio.to_thread.run_sync(throwaway.start)
            up.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(restart)
            for n, agent in enumerate(agents):
                tg.start_soon(careful, agent, cluster.replicas[n])

        assert [r["code"] for r in refused_while_down] == ["unavailable"] * 6
        assert all(r["retry_after_s"] > 0 and "127.0.0.1" not in r["message"] for r in refused_while_down)
        assert len(admitted) == 3 * per_agent
        states = await cluster.finished(list(admitted.values()))
        assert Counter(states.values()) == {"succeeded": 3 * per_agent}
        rows = cluster.rows("SELECT idempotency_key, id FROM jobs WHERE agent = ANY(?)", (list(agents),))
        assert dict(rows) == admitted  # one job per key: none lost, none made twice
        runs = cluster.provider_runs()
        assert {j: runs[j] for j in admitted.values()} == dict.fromkeys(admitted.values(), 1)
        assert cluster.reserved_micro() == 0
        [(committed,)] = cluster.rows("SELECT sum(cost_micro_usd) FROM ledger WHERE status = 'committed'")
        assert committed == 3 * per_agent * PRICE_MICRO
        cluster.stop()  # a replica writes the audit rows it set aside while the database was down, at
        # the latest as it stops: every refused request is one, and they join the one chain
        [(refusals,)] = cluster.rows(
            "SELECT count(*) FROM audit WHERE tool = 'http.auth' AND error_code = 'unavailable'"
        )
        assert refusals >= len(refused_while_down) + len(told_to_wait)
        verified = cluster.audit_verify()
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        cluster.stop()
