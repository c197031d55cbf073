"""The notifications outbox: events become rows in the database, and a loop in every serving process
delivers due rows to their webhooks, signed, retried with backoff, each outcome an audit row.

At least once: a row is marked delivered only after its receiver answered 2xx, so a process that
dies between the answer and the mark leaves it to be sent again (receivers deduplicate on the
`X-QPU-Gateway-Delivery` id). A claim is a lease (the row's next_attempt_at), so two processes
never deliver a row at the same time, and a row never waits behind another's slow receiver.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import anyio
import httpx2

from qpu_gateway.config import Config
from qpu_gateway.jobs.states import JobState
from qpu_gateway.policy.file import Policy, Rules, Webhook
from qpu_gateway.policy.quotas import PERIODS
from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import (
    AdmissionFacts,
    AuditEntry,
    DeliveryOutcome,
    JobRecord,
    LedgerTotals,
    NewJob,
    NewNotification,
    NotificationRecord,
    ledger_periods,
)
from qpu_gateway.telemetry import notifications
from qpu_gateway.telemetry.notifications import Event

log = logging.getLogger(__name__)

# Events raised where nothing can await (a breaker's change): queued here for the loop to store.
# A few hundred is far more than breakers change in a poll; beyond it an event is dropped, logged.
_SOON_BUFFER = 256
# A claim outlasts a delivery's timeout by this much, so a live deliverer is never overtaken.
_LEASE_MARGIN_S = 30.0


class _CutUrls(logging.Filter):
    """httpx2 logs every request's whole URL (at INFO), and a webhook's URL may hold its secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = notifications.without_urls(record.getMessage()), ()
        return True


logging.getLogger("httpx2").addFilter(_CutUrls())


class Outbox:
    """Turns events into outbox rows and, in `run`, delivers them."""

    def __init__(self, config: Config, policy: Callable[[], Policy]) -> None:
        self.config = config
        self._policy = policy
        self.owner = ""  # the process's lease owner, set by `run`
        self._wake = anyio.Event()
        self._soon_in, self._soon_out = anyio.create_memory_object_stream[Event](_SOON_BUFFER)
        self._in_flight = 0

    def wake(self) -> None:
        """Look for due rows now (one was just written here) instead of at the next poll."""
        self._wake.set()

    # -- events in -------------------------------------------------------------------------

    def rows(self, event: Event) -> list[NewNotification]:
        return notifications.outbox_rows(event, self._policy().notifications, time.time())

    async def emit(self, store: Store, event: Event) -> None:
        """Store `event` for every hook that wants it (its own insert); the database refusing is logged."""
        rows = self.rows(event)
        if not rows:
            return
        try:
            if await store.enqueue_notifications(rows, time.time()):
                self.wake()
        except StoreError as exc:
            log.warning("cannot store the %s notification: %s", event.kind, exc)

    def emit_soon(self, event: Event) -> None:
        """`emit` from code that cannot await; the loop stores it."""
        try:
            self._soon_in.send_nowait(event)
        except anyio.WouldBlock:
            log.warning("notification dropped (too many waiting to be stored): %s", event.summary)

    def breaker_changed(self, backend: str, state: str) -> None:
        """The workers' breakers' on-change callback."""
        if self._policy().notifications.hooks_for("breaker"):
            self.emit_soon(notifications.breaker_changed(backend=backend, state=state, process=self.owner))

    def for_admission(
        self, job: NewJob, rules: Rules, cost_micro_usd: int
    ) -> Callable[[AdmissionFacts], Sequence[NewNotification]] | None:
        """The outbox rows an admission writes in its own transaction (a held job, a budget crossed),
        made from the facts it read; None when no hook wants either."""
        config = self._policy().notifications
        held = job.state is JobState.PENDING_APPROVAL and bool(config.hooks_for("approval_needed"))
        budget = bool(config.hooks_for("budget")) and cost_micro_usd > 0
        if not held and not budget:
            return None

        def rows(facts: AdmissionFacts) -> list[NewNotification]:
            now = time.time()
            events: list[Event] = []
            if held:
                events.append(
                    notifications.approval_needed(
                        job_id=job.id,
                        agent=job.agent,
                        project=job.project,
                        backend=job.backend,
                        estimate_micro_usd=job.estimate_micro_usd if job.pricing_known else None,
                        level=job.approval_level,
                        expires_at=job.approval_expires_at,
                    )
                )
            if budget:
                for scope, who, totals in (("agent", job.agent, facts.agent), ("project", job.project, facts.project)):
                    before = _cost_used(totals)
                    after = {period: used + cost_micro_usd for period, used in before.items()}
                    events += self._budget_events(rules, scope, who, job.project, after, before, now)
            return [row for event in events for row in notifications.outbox_rows(event, config, now)]

        return rows

    async def after_settle(self, store: Store, job: JobRecord) -> None:
        """A job that cost more than it reserved may cross a threshold only now (`budget`)."""
        actual = job.actual_cost_micro_usd
        if actual is None or actual <= job.estimate_micro_usd or not self._policy().notifications.hooks_for("budget"):
            return
        rules, now, events = self._policy().rules_for(agent=job.agent, project=job.project), time.time(), []
        try:
            scopes: tuple[tuple[Literal["agent", "project"], str], ...] = (
                ("agent", job.agent),
                ("project", job.project),
            )
            for scope, who in scopes:
                totals = await store.ledger_totals(scope, who, now)
                events += self._budget_events(rules, scope, who, job.project, _cost_used(totals), None, now)
        except StoreError as exc:
            log.warning("cannot check budgets for notifications: %s", exc)
            return
        for event in events:  # each once per hook and period: a second process's row is not stored
            await self.emit(store, event)

    def _budget_events(
        self,
        rules: Rules,
        scope: str,
        who: str,
        project: str,
        after: dict[str, int],
        before: dict[str, int] | None,
        now: float,
    ) -> list[Event]:
        quota = rules.agent_quota if scope == "agent" else rules.project_quota
        day, month = ledger_periods(now)
        return notifications.budget_crossings(
            self._policy().notifications.budget_thresholds,
            quota.cost_usd,
            scope=scope,
            who=who,
            project=project,
            periods={"day": day, "month": month, "total": "total"},
            used_after=after,
            used_before=before,
        )

    # -- delivery --------------------------------------------------------------------------

    async def run(self, store: Store, owner: str) -> None:
        """Deliver due rows until cancelled; on the way out, give back the rows being delivered."""
        self.owner = owner
        timeout = httpx2.Timeout(self.config.notify_timeout_s)
        async with httpx2.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._store_soon, store)
                    await self._claim_loop(store, client, tg)
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await store.release_notifications(owner, time.time())
                    except StoreError as exc:
                        log.warning("could not give back notifications on shutdown (their claims lapse): %s", exc)

    async def _store_soon(self, store: Store) -> None:
        async for event in self._soon_out:
            await self.emit(store, event)

    async def _claim_loop(self, store: Store, client: httpx2.AsyncClient, tg: anyio.abc.TaskGroup) -> None:
        lease_s = self.config.notify_timeout_s + _LEASE_MARGIN_S
        while True:
            self._wake = anyio.Event()
            room = self.config.notify_in_flight - self._in_flight
            if room > 0:
                now = time.time()
                try:
                    claimed = await store.claim_notifications(self.owner, now + lease_s, now, room)
                except StoreError as exc:
                    log.warning("cannot claim notifications: %s", exc)
                    claimed = []
                for row in claimed:
                    self._in_flight += 1
                    tg.start_soon(self._deliver, store, client, row)
            with anyio.move_on_after(self.config.notify_poll_s):
                await self._wake.wait()

    async def _deliver(self, store: Store, client: httpx2.AsyncClient, row: NotificationRecord) -> None:
        try:
            hook = self._policy().notifications.hook(row.hook)
            refused = Refused("the webhook is no longer in the policy", final=True) if hook is None else None
            if hook is not None:
                refused = await self._post(client, hook, row)
            error = None if refused is None else refused.error
            outcome = self._outcome(row, refused)
            where = f"webhook {row.hook}" + (f" ({notifications.shown_url(hook.url)})" if hook else "")
            said = _said(row, where, outcome)
            audit = AuditEntry(
                tool=f"notify.{_VERB[outcome.status]}",
                decision="event",
                agent=row.agent,
                project=row.project,
                job_id=row.job_id,
                error_code=None if error is None else "delivery_failed",
                detail=said[:500],
            )
            try:
                kept = await store.finish_notification(row.id, self.owner, outcome, time.time(), audit)
            except StoreError as exc:  # its claim lapses and it is sent again: at least once
                log.warning("cannot record notification %d's outcome: %s", row.id, exc)
                return
            if kept:
                level = logging.INFO if outcome.status == "delivered" else logging.WARNING
                log.log(level, "notification %s", said, extra={"notification": row.id, "hook": row.hook})
        finally:
            self._in_flight -= 1
            self._wake.set()  # room for another, and rows may be due

    async def _post(self, client: httpx2.AsyncClient, hook: Webhook, row: NotificationRecord) -> Refused | None:
        """POST the row's body, signed if the hook has a secret; None on a 2xx, else what went wrong."""
        payload = row.body.encode()
        stamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "qpu-gateway",
            notifications.EVENT_HEADER: row.event,
            notifications.DELIVERY_HEADER: str(row.id),
            notifications.TIMESTAMP_HEADER: stamp,
        }
        if hook.secret_env is not None:
            secret = os.environ.get(hook.secret_env)
            if not secret:  # never sent unsigned to a receiver that expects a signature
                return Refused(f"${hook.secret_env} is not set in this process, so it cannot sign")
            headers[notifications.SIGNATURE_HEADER] = notifications.sign(secret.encode(), stamp, payload)
        # httpx2's timeout is per phase (connect, each read); this bounds the whole exchange.
        with anyio.move_on_after(self.config.notify_timeout_s):
            try:
                answer = await client.post(hook.url, content=payload, headers=headers)
            except httpx2.HTTPError as exc:
                return Refused(notifications.without_urls(f"{type(exc).__name__}: {exc}")[:200])
            return refusal_of(answer.status_code, answer.headers.get("retry-after"))
        return Refused(f"no answer within {self.config.notify_timeout_s:g} s")

    def _outcome(self, row: NotificationRecord, refused: Refused | None) -> DeliveryOutcome:
        if refused is None:
            return DeliveryOutcome("delivered")
        if refused.final or row.attempts >= self.config.notify_max_attempts:
            return DeliveryOutcome("dead", refused.error)
        wait = notifications.retry_delay(row.attempts, self.config.notify_retry_base_s, self.config.notify_retry_max_s)
        if refused.after_s is not None:  # the receiver said when: not sooner, and never past the cap
            wait = max(wait, min(refused.after_s, self.config.notify_retry_max_s))
        return DeliveryOutcome("pending", refused.error, time.time() + wait)


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a delivery did not land: `final` when the receiver said it never will, `after_s` its Retry-After."""

    error: str
    final: bool = False
    after_s: float | None = None


# 4xx answers that say "later", not "never" (RFC 9110 15.5: timeout, conflict, too early, too many).
_TRY_AGAIN_4XX = frozenset({408, 409, 425, 429})


def refusal_of(status: int, retry_after: str | None) -> Refused | None:
    """A receiver's answer as a delivery outcome: None for 2xx; a 4xx other than _TRY_AGAIN_4XX is
    final (a deleted Slack hook answers 404 or 410 for ever); a Retry-After in seconds is kept."""
    if 200 <= status < 300:
        return None
    after: float | None = None
    if retry_after is not None and retry_after.strip().isdigit():
        after = float(retry_after.strip())  # the HTTP-date form is rare for webhooks and ignored
    final = 400 <= status < 500 and status not in _TRY_AGAIN_4XX
    return Refused(f"HTTP {status}" + (" (the receiver refuses it: not retried)" if final else ""), final, after)


_VERB = {"delivered": "delivered", "pending": "retrying", "dead": "given_up"}


def _said(row: NotificationRecord, where: str, outcome: DeliveryOutcome) -> str:
    """A delivery's outcome in one line (the log and the audit row): no URL path, no secret."""
    head = f"{row.event} #{row.id} to {where}, attempt {row.attempts}"
    if outcome.status == "delivered":
        return f"{head}: delivered"
    if outcome.status == "dead":
        return f"{head}: given up ({outcome.error}); kept in the outbox as dead"
    return f"{head}: {outcome.error}; next try at {notifications.iso(outcome.next_attempt_at)}"


def _cost_used(totals: LedgerTotals) -> dict[str, int]:
    """Committed plus reserved micro-dollars per period."""
    usage = totals.usage()
    return {period: usage.used(period, "cost") for period in PERIODS}
