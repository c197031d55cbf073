"""Three HTTP replicas behind HAProxy (the README's recipe): both protocol eras through it, a person's
approval by elicitation, and a 2025-era subscriber hearing of a job another replica ran. Without
the recipe's stickiness a 2025-11-25 session breaks at its second request; 2026-07-28 does not."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import ElicitResult, ResourceUpdatedNotification

from .databases import create_postgres, drop_postgres
from .replicas import Balancer, Replica, haproxy, open_db, replicas
from .support import BELL2, body, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Hardware at $2 a job needs a person's yes above $1; every faulty/qpu job takes 1.5 s at the
# fake provider (in whichever replica runs it), time for a subscriber to subscribe.
POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
confirm_above_usd = "1.00"
loop_guard = { max_repeats = 100000, window_minutes = 1 }

[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "2.00"
per_shot_usd = "0"
"""
HARDWARE = {"circuit": BELL2, "backend": "faulty/qpu"}


@dataclass
class Cluster:
    db: str
    key: str
    replicas: list[Replica]
    sticky: Balancer  # the README's recipe
    plain: Balancer  # round robin with no stickiness


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("lb")
    (folder / "policy.toml").write_text(POLICY, encoding="utf-8")
    db = create_postgres()  # the replicas of a team that outgrew one machine share PostgreSQL
    try:
        with replicas(db, folder, 3, QPU_GATEWAY_FAULTS="mix:slow=1,slow_s=1.5,seed=1") as running:
            key = subprocess.run(
                [sys.executable, "-m", "qpu_gateway", "keys", "create", "--agent", "alice", "--db", db],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            ports = [r.port for r in running]
            with haproxy(folder, ports) as sticky, haproxy(folder, ports, sticky=False) as plain:
                yield Cluster(db, key, running, sticky, plain)
    finally:
        drop_postgres(db)


async def approve(context: Any, params: Any) -> ElicitResult:
    return ElicitResult(action="accept", content={"approve": True})


def client(url: str, key: str, mode: str, sessions: list[str] | None = None, **options: Any) -> Any:
    """A real MCP client session over Streamable HTTP (the caller enters it, with its HTTP client);
    `sessions` collects the Mcp-Session-Id the server hands out."""

    async def note(response: httpx2.Response) -> None:
        if sessions is not None and "mcp-session-id" in response.headers:
            sessions.append(response.headers["mcp-session-id"])

    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {key}"},
        timeout=httpx2.Timeout(30, read=300),
        event_hooks={"response": [note]},
    )
    return http, Client(streamable_http_client(url, http_client=http), mode=mode, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_both_eras_work_through_haproxy_including_a_persons_approval(cluster: Cluster, mode: str) -> None:
    asked: list[str] = []

    async def ask(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return await approve(context, params)

    http, session = client(cluster.sticky.url, cluster.key, mode, elicitation_callback=ask)
    async with http, session as agent:
        era = agent.protocol_version
        usage = [await agent.call_tool("get_usage", {}) for _ in range(4)]  # spread over the replicas
        submitted = body(await agent.call_tool("submit_job", HARDWARE))
        done = body(await agent.call_tool("wait_for_job", {"job_id": submitted["job_id"]}))
    assert era == ("2025-11-25" if mode == "legacy" else "2026-07-28")
    assert not any(u.is_error for u in usage)
    assert len(asked) == 1 and "$2.00" in asked[0]
    assert done["state"] == "succeeded"


async def session_home(cluster: Cluster, session_id: str) -> Replica:
    """The replica holding a 2025-era session: the only one that does not answer 404 for its id."""
    ping = {"jsonrpc": "2.0", "id": 99, "method": "ping"}
    headers = {
        "Authorization": f"Bearer {cluster.key}",
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": "2025-11-25",
        "Accept": "application/json, text/event-stream",
    }
    async with httpx2.AsyncClient() as http:
        homes = [r for r in cluster.replicas if (await http.post(r.url, json=ping, headers=headers)).status_code != 404]
    assert len(homes) == 1
    return homes[0]


async def runner_of(cluster: Cluster, job_id: str) -> int:
    """The pid of the replica whose worker claimed the job (its `job.claimed` audit row names it)."""
    store = await open_db(cluster.db)
    try:
        rows = [r for r in await store.audit_tail(limit=50, job_id=job_id) if r.tool == "job.claimed"]
    finally:
        await store.close()
    match = re.search(r"worker [^:]+:(\d+):", rows[-1].detail or "")
    assert match, rows
    return int(match.group(1))


async def heard_the_end(subscriber: Any, job_id: str, updates: list[str]) -> None:
    """Wait until the job has ended and the subscriber was told of a change."""

    async def ended() -> bool:
        done = body(await subscriber.call_tool("get_job", {"job_id": job_id}))["terminal"]
        return bool(done and updates)

    await eventually(ended, within_s=30, every=0.2)


async def test_a_2025_subscriber_through_haproxy_hears_when_another_replica_finishes_the_job(cluster: Cluster) -> None:
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, ResourceUpdatedNotification):
            updates.append(message.params.uri)

    sessions: list[str] = []
    http, session = client(cluster.sticky.url, cluster.key, "legacy", sessions, message_handler=on_message)
    async with http, session as subscriber:
        await subscriber.call_tool("get_usage", {})
        home = await session_home(cluster, sessions[0])
        elsewhere = next(r for r in cluster.replicas if r is not home)
        # The job is submitted to another replica directly; its worker takes it at once (the
        # subscriber's replica only looks every 0.5 s), so it nearly always runs it. Should the
        # subscriber's replica win the claim, the next job shows it.
        for _ in range(3):
            updates.clear()
            other_http, other = client(elsewhere.url, cluster.key, "2026-07-28", elicitation_callback=approve)
            async with other_http, other as submitter:
                job = body(await submitter.call_tool("submit_job", HARDWARE))
            await subscriber.subscribe_resource(job["uri"])
            # At the fake provider for 1.5 s: its one change left is its end, so an update now is that.
            at_subscribe = body(await subscriber.call_tool("get_job", {"job_id": job["job_id"]}))["state"]
            await heard_the_end(subscriber, job["job_id"], updates)
            if await runner_of(cluster, job["job_id"]) != home.process.pid:
                break
        final = body(await subscriber.call_tool("get_job", {"job_id": job["job_id"]}))
    assert await runner_of(cluster, job["job_id"]) != home.process.pid
    assert at_subscribe == "submitting" and final["state"] == "succeeded"
    assert updates and set(updates) == {job["uri"]}


async def test_without_stickiness_a_2025_session_breaks_and_2026_still_works(cluster: Cluster) -> None:
    http, session = client(cluster.plain.url, cluster.key, "legacy")
    with pytest.raises(BaseExceptionGroup) as broken:
        async with http, session as legacy:
            for _ in range(3):  # the initialize went to one replica; round robin sends the next elsewhere
                await legacy.call_tool("get_usage", {})
    assert [str(e) for e in leaves(broken.value)] == ["Session not found"]

    http, session = client(cluster.plain.url, cluster.key, "2026-07-28", elicitation_callback=approve)
    async with http, session as modern:
        usage = [await modern.call_tool("get_usage", {}) for _ in range(4)]
        # The approval's second round lands on another replica than the first: the requestState
        # sealed by one is opened by the other, under the key they share through the database.
        submitted = body(await modern.call_tool("submit_job", HARDWARE))
    assert not any(u.is_error for u in usage)
    assert submitted["state"] == "queued"


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in leaves(e)]
    return [group]


def test_the_recipe_in_the_readme_is_the_config_the_tests_run() -> None:
    from .replicas import HAPROXY_CONFIG

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    for line in HAPROXY_CONFIG.splitlines():
        if line.strip() and "{" not in line and not line.strip().startswith("#"):
            assert line.rstrip() in readme, line
