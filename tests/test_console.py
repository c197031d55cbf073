"""The operator console in a real browser (Debian's Chromium through Playwright) against a real
`qpu-gateway serve --transport http`, with a real MCP client as the agent: an operator sees the job
the agent's submit_job just held, and their Approve or Deny reaches the agent's wait_for_job.

One browser for the module; each test has its own gateway and database. Screenshots of every page
go to /tmp/console-shots/ (QPU_GATEWAY_CONSOLE_SHOTS elsewhere) for a person to look at.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import playwright.async_api as playwright
import pytest
from mcp import Client

from qpu_gateway.config import Config
from qpu_gateway.ops.console.auth import create_operator
from qpu_gateway.store import open_store

from .support import (
    BELL2,
    HttpServer,
    body,
    free_port,
    gateway_cmd,
    http_client,
    location_of,
    new_key,
    start_http_server,
    stdio_params,
    stop_process,
    wait_listening,
)

pytestmark = pytest.mark.anyio

CHROMIUM = "/usr/bin/chromium"
SHOTS = Path(os.environ.get("QPU_GATEWAY_CONSOLE_SHOTS", "/tmp/console-shots"))
PASSWORD = "correct horse battery"
# A $6.00 job on faulty/qpu needs an operator's yes ($5.00 threshold); alice may spend $100 a day.
POLICY = """
[defaults]
allowed_backends = ["aer/*", "faulty/*"]
loop_guard = { max_repeats = 100000, window_minutes = 1 }
operator_above_usd = "5.00"
agent_quota = { cost_usd = { day = "100.00", month = "500.00" } }

[prices."faulty/*"]
model = "per_task_shot"
per_task_usd = "6.00"
per_shot_usd = "0.00"
"""
PRICED = {"circuit": BELL2, "backend": "faulty/qpu", "shots": 200}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Any]:
    if not await anyio.Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium package (apt-get install chromium)")
    async with playwright.async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
def gateway_http(config: Config) -> Iterator[HttpServer]:
    config.policy_path.write_text(POLICY, encoding="utf-8")
    server = start_http_server(config, QPU_GATEWAY_FAULTS="ok")
    yield server
    server.stop()


@pytest.fixture
async def page(browser: Any, gateway_http: HttpServer) -> AsyncIterator[Any]:
    context = await browser.new_context(
        base_url=f"http://127.0.0.1:{gateway_http.port}", viewport={"width": 1280, "height": 900}
    )
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def operator(config: Config, name: str, role: str) -> None:
    store = await open_store(config.database)
    try:
        await create_operator(store, name, role, PASSWORD, by="tests")
    finally:
        await store.close()


async def sign_in(page: Any, name: str, password: str = PASSWORD) -> Any:
    await page.goto("/console/login")
    await page.get_by_label("Operator name").fill(name)
    await page.get_by_label("Password").fill(password)
    async with page.expect_navigation():
        await page.get_by_role("button", name="Sign in").click()
    return page


async def shot(page: Any, name: str) -> None:
    await anyio.Path(SHOTS).mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


async def audit_rows(config: Config, tool: str) -> list[Any]:
    store = await open_store(config.database)
    try:
        return [r for r in await store.audit_tail(limit=500) if r.tool == tool]
    finally:
        await store.close()


async def test_an_approver_sees_a_held_job_appear_and_approving_it_ends_the_agents_wait_succeeded(
    config: Config, gateway_http: HttpServer, page: Any
) -> None:
    await operator(config, "olga", "admin")
    key = await new_key(config.database, "alice")
    await sign_in(page, "olga")
    assert page.url.endswith("/console/approvals")
    await page.get_by_text("No job is waiting for approval.").wait_for()

    waited: dict[str, Any] = {}
    async with http_client(gateway_http.url, key) as agent:
        held = body(await agent.call_tool("submit_job", PRICED))
        assert held["code"] == "approval_required"
        job_id = held["job_id"]

        # No reload: the page's poll brings the card in.
        card = page.locator(f'article[data-job="{job_id}"]')
        await card.wait_for(timeout=10_000)
        text = await card.inner_text()
        assert all(part in text for part in ("alice", "default", "faulty/qpu", "200 x 1", "$6.00", "per task"))
        assert "agent day: $94.00 left of $100.00" in text  # its own $6.00 is reserved already
        assert "┌───┐" in text and "H" in text  # Qiskit's text drawing of the Bell circuit
        await shot(page, "approvals")

        async def wait() -> None:
            waited["job"] = body(await agent.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.3)  # the agent is waiting before the operator decides
            with anyio.fail_after(30):
                async with page.expect_navigation():
                    await card.get_by_role("button", name="Approve").click()
        assert waited["job"]["state"] == "succeeded", waited
        assert await page.get_by_role("status").inner_text() == f"Job {job_id} approved: it is queued."

    [row] = await audit_rows(config, "approvals.approve")
    assert (row.operator, row.job_id) == ("olga (console)", job_id)
    assert [r.decision for r in await audit_rows(config, "console.login")] == ["ok"]

    # Every other page, as an admin sees it.
    await page.goto("/console/jobs?agent=alice&state=succeeded")
    assert job_id in await page.locator("table").inner_text()
    await shot(page, "jobs")
    await page.get_by_role("link", name=job_id).click()
    assert await page.locator("svg.chart title").first.text_content() == "Counts of circuit 1 (c)"
    assert "approved" in await page.locator("table").inner_text()
    await shot(page, "job")
    await page.goto("/console/spend")
    assert "agent alice" in (await page.locator("svg.chart").first.text_content() or "")
    await shot(page, "spend")
    await page.goto("/console/backends")
    assert "faulty/qpu" in await page.locator("table").inner_text()
    await shot(page, "backends")
    await page.goto("/console/audit?tool=approvals")
    assert "Chain intact" in await page.get_by_role("status").inner_text()
    await shot(page, "audit")
    async with page.expect_download() as download:
        await page.get_by_role("link", name="Export every row as JSON lines").click()
    exported = await anyio.Path(await (await download.value).path()).read_text(encoding="utf-8")
    assert '"tool":"approvals.approve"' in exported
    await page.goto("/console/policy")
    assert "Last reload error" in await page.locator("dl").inner_text()
    await shot(page, "policy")

    # A key made here is shown once, and its creation names the operator.
    await page.goto("/console/agents")
    await page.get_by_label("Agent", exact=True).fill("bob")
    async with page.expect_navigation():
        await page.get_by_role("button", name="Create key").click()
    made = await page.get_by_label("Key", exact=True).input_value()
    assert re.fullmatch(r"qpg_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", made)
    await shot(page, "agents")
    await page.goto("/console/agents")
    assert made not in await page.content()
    [created] = [r for r in await audit_rows(config, "keys.create") if r.agent == "bob"]
    assert created.operator == "olga (console)" and made not in (created.detail or "")


async def test_a_denial_reaches_the_agents_wait_as_approval_denied(
    config: Config, gateway_http: HttpServer, page: Any
) -> None:
    await operator(config, "ann", "approver")
    key = await new_key(config.database, "alice")
    async with http_client(gateway_http.url, key) as agent:
        job_id = body(await agent.call_tool("submit_job", PRICED))["job_id"]
        await sign_in(page, "ann")
        card = page.locator(f'article[data-job="{job_id}"]')
        await card.get_by_label("Reason").fill("too dear for a test")
        async with page.expect_navigation():
            await card.get_by_role("button", name="Deny").click()
        waited = body(await agent.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 30}))
    assert waited["state"] == "rejected"
    assert waited["error"]["code"] == "approval_denied"
    assert "too dear for a test" in waited["error"]["message"]
    # An approver may decide, but not administer: no key or pause controls for them.
    await page.goto("/console/agents")
    assert await page.get_by_role("button", name="Create key").count() == 0


async def test_a_viewer_has_no_approve_button_and_a_forged_approval_is_refused(
    config: Config, gateway_http: HttpServer, page: Any
) -> None:
    await operator(config, "vic", "viewer")
    key = await new_key(config.database, "alice")
    async with http_client(gateway_http.url, key) as agent:
        job_id = body(await agent.call_tool("submit_job", PRICED))["job_id"]
    await sign_in(page, "vic")
    card = page.locator(f'article[data-job="{job_id}"]')
    await card.wait_for()
    assert await card.get_by_role("button").count() == 0
    csrf = await page.locator('form[action="/console/logout"] input[name=csrf]').input_value()

    forged = await page.request.post(f"/console/approvals/{job_id}/approve", form={"csrf": csrf})

    assert forged.status == 403
    assert "needs the approver role" in await forged.text()
    assert await audit_rows(config, "approvals.approve") == []


async def test_a_post_without_the_sessions_csrf_token_is_refused(
    config: Config, gateway_http: HttpServer, page: Any
) -> None:
    await operator(config, "ann", "approver")
    key = await new_key(config.database, "alice")
    async with http_client(gateway_http.url, key) as agent:
        job_id = body(await agent.call_tool("submit_job", PRICED))["job_id"]
    await sign_in(page, "ann")

    missing = await page.request.post(f"/console/approvals/{job_id}/approve", form={})
    wrong = await page.request.post(f"/console/approvals/{job_id}/approve", form={"csrf": "0" * 64})

    assert (missing.status, wrong.status) == (403, 403)
    assert "CSRF" in await missing.text()
    assert await audit_rows(config, "approvals.approve") == []


async def test_a_wrong_password_is_refused_and_the_sixth_try_is_rate_limited(
    config: Config, gateway_http: HttpServer, page: Any
) -> None:
    await operator(config, "ann", "approver")
    for _ in range(5):
        await sign_in(page, "ann", "not the password")
        assert await page.get_by_role("alert").inner_text() == "Wrong name or password."
    await shot(page, "login")

    await sign_in(page, "ann")  # the right password, after five failures: wait

    assert "Too many failed logins" in await page.get_by_role("alert").inner_text()
    assert page.url.endswith("/console/login")
    refusals = [(r.decision, r.error_code) for r in await audit_rows(config, "console.login")]
    assert refusals == [("refused", "unauthorized")] * 5 + [("refused", "rate_limited")]
    assert not any(
        PASSWORD in (r.detail or "") or "not the password" in (r.detail or "")
        for r in await audit_rows(config, "console.login")
    )
    cookies = await page.context.cookies()
    assert not any(c["name"] == "qpu_console" for c in cookies)


async def test_a_session_cookie_is_http_only_and_strict_and_pages_need_one(
    config: Config, gateway_http: HttpServer, page: Any
) -> None:
    await operator(config, "ann", "viewer")
    answer = await page.request.get("/console/jobs", max_redirects=0)
    assert (answer.status, answer.headers["location"]) == (303, "/console/login")
    await sign_in(page, "ann")
    [cookie] = [c for c in await page.context.cookies() if c["name"] == "qpu_console"]
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/console")
    assert cookie["secure"] is False  # plain http on loopback; https sets Secure
    await page.get_by_role("button", name="Sign out").click()
    await page.wait_for_url("**/console/login")
    answer = await page.request.get("/console/jobs", max_redirects=0)
    assert answer.status == 303


def test_operators_are_made_listed_and_disabled_from_the_cli_with_the_password_on_stdin(config: Config) -> None:
    from .support import set_up_database

    set_up_database(config.database)
    where = ["--db", str(config.db_path), "--policy", str(config.policy_path)]

    def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(gateway_cmd(*args, *where), input=stdin, capture_output=True, text=True, check=False)

    made = cli("operators", "create", "olga", "--role", "admin", stdin=PASSWORD + "\n")
    short = cli("operators", "create", "otto", "--role", "viewer", stdin="short\n")
    again = cli("operators", "create", "olga", "--role", "viewer", stdin=PASSWORD + "\n")
    listed = cli("operators", "list")
    disabled = cli("operators", "disable", "olga")
    after = cli("operators", "list", "--json")

    assert made.returncode == 0, made.stderr
    assert (short.returncode, again.returncode) == (1, 1)
    assert "at least 12 characters" in short.stderr and "exists already" in again.stderr
    assert re.search(r"olga\s+admin\s+\S+ \S+\s+enabled", listed.stdout)
    assert disabled.returncode == 0 and '"disabled_at": null' not in after.stdout
    for done in (made, short, again, listed, disabled, after):
        assert PASSWORD not in done.stdout + done.stderr


async def test_console_serve_alone_approves_a_job_a_stdio_agent_waits_for(config: Config, browser: Any) -> None:
    """An installation of stdio servers only: the console runs on its own, on the same database."""
    config.policy_path.write_text(POLICY, encoding="utf-8")
    await operator(config, "olga", "approver")
    key = await new_key(config.database, "alice")
    port = free_port()
    command = gateway_cmd("console", "serve", "--port", str(port), "--db", location_of(config.database))

    def start() -> subprocess.Popen[bytes]:
        started = subprocess.Popen([*command, "--policy", str(config.policy_path)])
        wait_listening(started, port, what="console")
        return started

    console = await anyio.to_thread.run_sync(start)
    try:
        async with Client(stdio_params(config, key, QPU_GATEWAY_FAULTS="ok")) as agent:
            job_id = body(await agent.call_tool("submit_job", PRICED))["job_id"]
            context = await browser.new_context(base_url=f"http://127.0.0.1:{port}")
            try:
                page = await sign_in(await context.new_page(), "olga")
                card = page.locator(f'article[data-job="{job_id}"]')
                async with page.expect_navigation():
                    await card.get_by_role("button", name="Approve").click()
            finally:
                await context.close()
            waited = body(await agent.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 60}))
    finally:
        await anyio.to_thread.run_sync(stop_process, console)
    assert waited["state"] == "succeeded"
    approved = await audit_rows(config, "approvals.approve")
    assert [(r.job_id, r.operator) for r in approved] == [(job_id, "olga (console)")]
