"""Webhook notifications from the outbox, against a real HTTP receiver on loopback that is up, down, then
slow: signed deliveries with no secret in them, retries that survive a restart of the gateway, one
delivery per row across two gateways on one database, and a held job's approval_needed message.

(tests/test_notifications.py is about MCP notifications to clients; this file is about webhooks.)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio
import pytest

from qpu_gateway.config import Config
from qpu_gateway.jobs.breaker import Breakers
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.policy.file import Notifications, PeriodCaps, PolicyFileError, parse_policy
from qpu_gateway.store import Store, open_store
from qpu_gateway.store.records import AuditEntry, DeliveryOutcome, NewNotification, NotificationRecord
from qpu_gateway.telemetry import notifications
from qpu_gateway.telemetry.notifications import Event

from .conftest import TEST_POLICY
from .databases import BACKENDS
from .support import BELL2, body, eventually, free_port, gateway_cmd, in_memory, location_of

pytestmark = pytest.mark.anyio

SECRET = "whsec-test-0123456789abcdef"  # the signing secret, in the environment only
SECRET_ENV = "QPU_GATEWAY_TEST_WEBHOOK_SECRET"
URL_SECRET = "T0SECRETPATHB0"  # what a Slack URL hides in its path: never shown


# -- the receiver -------------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on 127.0.0.1 in a thread: records each POST; paths in `slow` wait for `release`."""

    def __init__(self, port: int = 0) -> None:
        self.got: list[tuple[str, dict[str, str], bytes]] = []
        self.slow: set[str] = set()
        self.answers: dict[str, tuple[int, dict[str, str]]] = {}  # path -> (status, headers) instead of 200
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path in receiver.slow:
                    receiver.release.wait(10)
                receiver.got.append((self.path, dict(self.headers.items()), payload))
                status, extra = receiver.answers.get(self.path, (200, {}))
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def bodies(self, path: str | None = None) -> list[dict[str, Any]]:
        return [json.loads(b) for p, _, b in self.got if path is None or p == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    up = Receiver()
    yield up
    up.stop()


def hook(name: str, url: str, *, format: str = "json", events: str = '["breaker"]', signed: bool = True) -> str:
    secret = f'secret_env = "{SECRET_ENV}"\n' if signed else ""
    head = f'[[notifications.webhooks]]\nname = "{name}"\nurl = "{url}"\n'
    return head + f'format = "{format}"\nevents = {events}\n{secret}'


def fast(config: Config, hooks: str, *, policy: str = TEST_POLICY, **overrides: Any) -> Config:
    """The test config with the hooks in its policy and quick outbox timings."""
    config.policy_path.write_text(policy + "\n" + hooks, encoding="utf-8")
    knobs = {"notify_retry_base_s": 0.05, "notify_retry_max_s": 0.2, "notify_poll_s": 0.05, "notify_timeout_s": 5.0}
    return Config(**{**config.__dict__, **knobs, **overrides})


def breaker_event(backend: str = "faulty/qpu") -> Event:
    return notifications.breaker_changed(backend=backend, state="open", process="test")


async def outbox(store: Store) -> list[NotificationRecord]:
    return sorted(await store.notifications(limit=1000), key=lambda n: n.id)


async def notify_audit(store: Store) -> list[tuple[str, str | None, str | None]]:
    rows = await store.audit_tail(limit=1000)
    return [(r.tool, r.error_code, r.detail) for r in rows if r.tool.startswith("notify.")]


# -- up -------------------------------------------------------------------------------------------


async def test_a_delivery_arrives_signed_with_no_secret_and_is_audited(
    config: Config, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    gateway = Gateway(fast(config, hook("ops", receiver.url(f"/hooks/{URL_SECRET}"))))
    async with gateway.running():
        await gateway.outbox.emit(gateway.store, breaker_event())

        async def arrived() -> bool:
            return bool(receiver.got) and (await outbox(gateway.store))[0].status == "delivered"

        await eventually(arrived, within_s=20, every=0.02)
        rows, audit = await outbox(gateway.store), await notify_audit(gateway.store)
    _, headers, payload = receiver.got[0]
    stamp = headers[notifications.TIMESTAMP_HEADER]
    expected = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + payload, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers[notifications.SIGNATURE_HEADER], expected)
    assert headers[notifications.EVENT_HEADER] == "breaker"
    assert headers[notifications.DELIVERY_HEADER] == str(rows[0].id)
    sent = json.loads(payload)
    assert sent["event"] == "breaker" and sent["details"]["backend"] == "faulty/qpu" and sent["at"].endswith("Z")
    assert "faulty/qpu" in sent["summary"]
    assert len(receiver.got) == 1 and rows[0].attempts == 1
    assert [tool for tool, _, _ in audit] == ["notify.delivered"]
    assert f"127.0.0.1:{receiver.port}/…" in (audit[0][2] or "")
    # The secret and the URL's path appear nowhere: not sent, not stored, not audited, not logged.
    assert "POST http://127.0.0.1" in caplog.text  # httpx2's own line, cut to the host
    for seen in (payload.decode(), repr(rows), repr(audit), caplog.text):
        assert SECRET not in seen
        assert URL_SECRET not in seen


# -- down, then up, across a restart ---------------------------------------------------------------


@pytest.mark.parametrize("db_backend", BACKENDS)
async def test_rows_wait_while_the_receiver_is_down_and_go_once_after_a_restart(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    port = free_port()  # nothing listens there yet
    cfg = fast(config, hook("ops", f"http://127.0.0.1:{port}/in"))
    first = Gateway(cfg)
    async with first.running():
        for backend in ("faulty/a", "faulty/b"):
            await first.outbox.emit(first.store, breaker_event(backend))

        async def retried() -> bool:
            return all(row.attempts >= 2 for row in await outbox(first.store))

        await eventually(retried, within_s=20, every=0.02)
    store = await open_store(cfg.database)
    try:
        stopped = await outbox(store)
    finally:
        await store.close()
    assert [row.status for row in stopped] == ["pending", "pending"]
    assert all(row.lease_owner is None for row in stopped)  # given back at shutdown, due again

    up = Receiver(port)
    try:
        second = Gateway(cfg)  # a new process on the same database
        async with second.running():

            async def delivered() -> bool:
                return all(row.status == "delivered" for row in await outbox(second.store))

            await eventually(delivered, within_s=20, every=0.02)
            audit = await notify_audit(second.store)
    finally:
        up.stop()
    assert sorted(b["details"]["backend"] for b in up.bodies()) == ["faulty/a", "faulty/b"]
    tools = [tool for tool, _, _ in audit]
    assert tools.count("notify.delivered") == 2 and tools.count("notify.retrying") >= 2
    retrying = next(detail for tool, _, detail in audit if tool == "notify.retrying")
    assert "ConnectError" in (retrying or "") and "next try at" in (retrying or "")


async def test_a_receiver_that_stays_down_is_given_up_and_the_row_kept_as_dead(config: Config) -> None:
    port = free_port()
    gateway = Gateway(fast(config, hook("ops", f"http://127.0.0.1:{port}/in", signed=False), notify_max_attempts=3))
    async with gateway.running():
        await gateway.outbox.emit(gateway.store, breaker_event())

        async def dead() -> bool:
            return (await outbox(gateway.store))[0].status == "dead"

        await eventually(dead, within_s=20, every=0.02)
        rows, audit = await outbox(gateway.store), await notify_audit(gateway.store)
    assert rows[0].attempts == 3 and rows[0].finished_at is not None and "ConnectError" in (rows[0].last_error or "")
    assert [tool for tool, _, _ in audit] == ["notify.retrying", "notify.retrying", "notify.given_up"]
    assert all(code == "delivery_failed" for _, code, _ in audit)
    # An operator finds it with the CLI: the dead row, its tries and why.
    listed = await anyio.run_process(
        gateway_cmd("notifications", "list", "--status", "dead", "--json", "--db", location_of(config.database))
    )
    (shown,) = json.loads(listed.stdout.decode())
    assert (shown["status"], shown["attempts"], shown["event"]) == ("dead", 3, "breaker")
    assert "ConnectError" in shown["last_error"] and f"{port}/in" not in listed.stdout.decode()


async def test_a_receiver_that_says_never_is_given_up_at_once_and_one_that_says_later_is_waited_for(
    config: Config, receiver: Receiver
) -> None:
    receiver.answers["/gone"] = (410, {})  # a deleted hook: retrying cannot help
    receiver.answers["/busy"] = (429, {"Retry-After": "1"})
    hooks = hook("gone", receiver.url("/gone"), signed=False) + hook("busy", receiver.url("/busy"), signed=False)
    gateway = Gateway(fast(config, hooks, notify_retry_max_s=5.0))
    async with gateway.running():
        await gateway.outbox.emit(gateway.store, breaker_event())

        async def both_answered() -> bool:
            rows = {row.hook: row for row in await outbox(gateway.store)}
            return rows["gone"].status == "dead" and rows["busy"].last_error is not None

        await eventually(both_answered, within_s=20, every=0.02)
        rows = {row.hook: row for row in await outbox(gateway.store)}
    assert rows["gone"].attempts == 1 and "not retried" in (rows["gone"].last_error or "")
    busy = rows["busy"]
    assert busy.status == "pending" and busy.last_error == "HTTP 429"
    # Retried no sooner than the receiver asked (1 s), though the backoff alone would be 0.05-0.1 s.
    first = next(n for n, (path, _, _) in enumerate(receiver.got) if path == "/busy")
    assert busy.next_attempt_at - float(receiver.got[first][1]["X-QPU-Gateway-Timestamp"]) >= 0.9


async def test_a_hook_whose_secret_is_not_set_is_never_sent_unsigned(config: Config, receiver: Receiver) -> None:
    gateway = Gateway(fast(config, hook("ops", receiver.url("/in")), notify_max_attempts=2))
    async with gateway.running():
        await gateway.outbox.emit(gateway.store, breaker_event())

        async def dead() -> bool:
            return (await outbox(gateway.store))[0].status == "dead"

        await eventually(dead, within_s=20, every=0.02)
        rows = await outbox(gateway.store)
    assert receiver.got == [] and f"${SECRET_ENV} is not set" in (rows[0].last_error or "")


# -- slow -------------------------------------------------------------------------------------------


async def test_a_slow_receiver_times_out_without_holding_up_other_rows(
    config: Config, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    receiver.slow.add("/slow")
    hooks = hook("slow", receiver.url("/slow")) + hook("quick", receiver.url("/quick"))
    gateway = Gateway(fast(config, hooks, notify_timeout_s=0.5))
    async with gateway.running():
        await gateway.outbox.emit(gateway.store, breaker_event("faulty/first"))  # to both hooks
        await gateway.outbox.emit(gateway.store, breaker_event("faulty/second"))

        async def timed_out() -> bool:
            return any(
                tool == "notify.retrying" and "no answer within 0.5 s" in (detail or "")
                for tool, _, detail in await notify_audit(gateway.store)
            )

        await eventually(timed_out, within_s=20, every=0.02)
        quick_before_slow = sorted(b["details"]["backend"] for b in receiver.bodies("/quick"))
        receiver.slow.clear()  # the receiver recovers: the next try of the slow rows gets through
        receiver.release.set()

        async def all_delivered() -> bool:
            return all(row.status == "delivered" for row in await outbox(gateway.store))

        await eventually(all_delivered, within_s=20, every=0.02)
    assert quick_before_slow == ["faulty/first", "faulty/second"]
    # At least once: a timed-out POST the receiver did take in the end shows up again (same delivery id).
    slow_ids = {h[notifications.DELIVERY_HEADER] for p, h, _ in receiver.got if p == "/slow"}
    assert len(slow_ids) == 2


# -- two gateways, one database -------------------------------------------------------------------


@pytest.mark.parametrize("db_backend", BACKENDS)
async def test_two_gateways_on_one_database_deliver_each_row_once(
    config: Config, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    cfg = fast(config, hook("ops", receiver.url("/in")))
    one, two = Gateway(cfg), Gateway(cfg)
    async with one.running(), two.running():
        rows = [r for i in range(40) for r in one.outbox.rows(breaker_event(f"faulty/b{i}"))]
        assert await one.store.enqueue_notifications(rows, time.time()) == 40
        one.outbox.wake()
        two.outbox.wake()

        async def delivered() -> bool:
            return sum(row.status == "delivered" for row in await outbox(one.store)) == 40

        await eventually(delivered, within_s=30, every=0.05)
        audit = await notify_audit(one.store)
    ids = [h[notifications.DELIVERY_HEADER] for _, h, _ in receiver.got]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert [tool for tool, _, _ in audit].count("notify.delivered") == 40


# -- a held job over MCP ------------------------------------------------------------------------------

PRICED = 'model = "per_task_shot"\nper_task_usd = "6.00"\nper_shot_usd = "0"'
PRICED_HELD = TEST_POLICY.replace('model = "free"', PRICED)
PRICED_HELD = PRICED_HELD.replace("[defaults]\n", '[defaults]\noperator_above_usd = "5.00"\n', 1)


async def test_a_held_job_tells_the_operator_how_to_approve_it(
    config: Config, alice_key: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    hooks = hook("slack", receiver.url("/slack"), format="slack", events='["approval_needed"]')
    gateway = Gateway(fast(config, hooks, policy=PRICED_HELD, faults="ok"))
    async with gateway.running(), in_memory(gateway, alice_key) as client:
        held = body(await client.call_tool("submit_job", {"circuit": BELL2, "backend": "faulty/qpu"}))

        async def arrived() -> bool:
            return bool(receiver.got)

        await eventually(arrived, within_s=20, every=0.02)
        rows = await outbox(gateway.store)
    assert held["code"] == "approval_required"
    job_id = held["job_id"]
    [sent] = receiver.bodies("/slack")
    assert set(sent) == {"text", "blocks"}
    assert f"qpu-gateway approvals approve {job_id}" in sent["text"]
    assert f"qpu-gateway approvals deny {job_id}" in sent["text"] and "$6.00" in sent["text"]
    assert alice_key not in json.dumps(sent) and BELL2.splitlines()[2] not in json.dumps(sent)
    assert [(r.event, r.job_id, r.agent) for r in rows] == [("approval_needed", job_id, "alice")]


# -- the store's claim, on both backends ------------------------------------------------------------


@pytest.mark.parametrize("db_backend", BACKENDS)
async def test_a_claimed_row_is_nobody_elses_until_its_lease_lapses(config: Config) -> None:
    store = await open_store(config.database)
    try:
        row = NewNotification(hook="ops", event="storm", body="{}", agent="alice", dedup_key="ops|x")
        assert await store.enqueue_notifications([row, row], 100.0) == 1  # the dedup key: once
        [mine] = await store.claim_notifications("a", 200.0, 100.0, 10)
        assert await store.claim_notifications("b", 300.0, 150.0, 10) == []
        [again] = await store.claim_notifications("b", 400.0, 250.0, 10)  # a's lease lapsed at 200
        audit = AuditEntry(tool="notify.delivered", decision="event")
        assert not await store.finish_notification(mine.id, "a", DeliveryOutcome("delivered"), 260.0, audit)
        assert await store.finish_notification(again.id, "b", DeliveryOutcome("delivered"), 260.0, audit)
        [done] = await store.notifications(status="delivered")
        audit_rows = [r.tool for r in await store.audit_tail(limit=10)]
    finally:
        await store.close()
    assert (mine.attempts, again.attempts, done.attempts, done.finished_at) == (1, 2, 2, 260.0)
    assert audit_rows == ["notify.delivered"]  # the stale owner's outcome wrote nothing


# -- the pure part ------------------------------------------------------------------------------------


def test_a_budget_threshold_is_crossed_once_per_period_and_threshold() -> None:
    caps = PeriodCaps(day=Decimal("10"), month=Decimal("100"))
    periods = {"day": "2026-01-02", "month": "2026-01", "total": "total"}
    crossed = notifications.budget_crossings(
        (Decimal("0.8"), Decimal("1")),
        caps,
        scope="agent",
        who="alice",
        project="default",
        periods=periods,
        used_before={"day": 7_000_000, "month": 7_000_000},
        used_after={"day": 10_000_000, "month": 10_000_000},
    )
    assert [(e.details["period"], e.details["threshold"]) for e in crossed] == [("day", "0.8"), ("day", "1")]
    assert crossed[0].once == "budget:agent:alice:day:2026-01-02:0.8"
    assert "80%" in crossed[0].summary and "$10.00 of $10.00" in crossed[0].summary
    again = notifications.budget_crossings(
        (Decimal("0.8"),),
        caps,
        scope="agent",
        who="alice",
        project="default",
        periods=periods,
        used_before={"day": 8_500_000},
        used_after={"day": 9_000_000},
    )
    assert again == []  # already past it before this job


def test_webhooks_in_the_policy_name_their_secret_by_variable_and_errors_never_repeat_the_url() -> None:
    text = TEST_POLICY + hook("ops", f"https://hooks.slack.com/services/{URL_SECRET}", format="slack")
    parsed = parse_policy(text).notifications
    assert parsed.webhooks[0].secret_env == SECRET_ENV and parsed.budget_thresholds == (Decimal("0.8"), Decimal("1"))
    assert [h.name for h in parsed.hooks_for("breaker")] == ["ops"] and parsed.hooks_for("storm") == []
    for bad in (
        hook("ops", f"ftp://hooks.slack.com/{URL_SECRET}"),
        hook("ops", "https://a.example/1") + hook("ops", "https://a.example/2"),
        hook("ops", "https://a.example/1").replace(SECRET_ENV, "not a variable"),
    ):
        with pytest.raises(PolicyFileError) as refused:
            parse_policy(TEST_POLICY + bad)
        assert URL_SECRET not in str(refused.value) and "notifications" in str(refused.value)
    assert Notifications.model_validate({"budget_thresholds": [1.0, 0.5]}).budget_thresholds == (
        Decimal("0.5"),
        Decimal("1.0"),
    )


def test_a_signature_is_the_hmac_of_the_timestamp_and_the_body_and_urls_are_cut_to_their_host() -> None:
    assert notifications.sign(b"k", "1700000000", b"{}") == (
        "sha256=" + hmac.new(b"k", b"1700000000.{}", hashlib.sha256).hexdigest()
    )
    assert notifications.shown_url(f"https://user:pw@hooks.slack.com/services/{URL_SECRET}?x=1") == (
        "https://hooks.slack.com/…"
    )
    said = notifications.without_urls(f"ConnectError: cannot reach https://h.example/{URL_SECRET} now")
    assert said == "ConnectError: cannot reach https://h.example/… now"


def test_retry_waits_double_from_the_base_to_the_cap_with_jitter() -> None:
    waits = [notifications.retry_delay(n, 1.0, 8.0) for n in range(1, 7)]
    for n, wait in enumerate(waits, start=1):
        step = min(8.0, 2.0 ** (n - 1))
        assert step / 2 <= wait <= step


def test_a_breaker_reports_opening_once_and_closing() -> None:
    seen: list[tuple[str, str]] = []
    breakers = Breakers(threshold=2, cooldown_s=0.0)
    breakers.on_change = lambda backend, state: seen.append((backend, state))
    breakers.failure("b")
    breakers.failure("b")  # opens
    breakers.started("b")  # half-open at once (no cooldown): the probe
    breakers.failure("b")  # the probe failed: open again, not a new event
    breakers.success("b")  # closes
    breakers.success("b")  # was closed: nothing
    assert seen == [("b", "open"), ("b", "closed")]


def test_a_slack_body_escapes_what_slack_would_read_as_a_mention() -> None:
    event = Event("storm", "agent <!channel> & co", {})
    sent = json.loads(notifications.body(event, "slack", 0.0))
    assert "<!channel>" not in sent["text"] and "&lt;!channel&gt; &amp; co" in sent["text"]
