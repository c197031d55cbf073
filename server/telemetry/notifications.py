"""Webhook notifications, the pure part: which events go to which hook, their bodies, their signature.

Events: a job held for approval (`approval_needed`, with how to approve), an agent's storm of refused
calls (`storm`), a budget threshold crossed (`budget`), a backend's breaker opened or closed
(`breaker`). A body holds names, ids, amounts and states only: never a key, a secret, a provider
credential or a job's circuits. `server/telemetry/outbox.py` stores and delivers them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from qpu_gateway.policy.file import Notifications, PeriodCaps
from qpu_gateway.policy.pricing import MICRO_USD_PER_USD, format_usd
from qpu_gateway.policy.storm import Storm
from qpu_gateway.store.records import NewNotification

SIGNATURE_HEADER = "X-QPU-Gateway-Signature"
TIMESTAMP_HEADER = "X-QPU-Gateway-Timestamp"
EVENT_HEADER = "X-QPU-Gateway-Event"
DELIVERY_HEADER = "X-QPU-Gateway-Delivery"  # the outbox row's id: the same on a repeated delivery
_PERIOD_WORD = {"day": "daily", "month": "monthly", "total": "total"}


@dataclass(frozen=True, slots=True)
class Event:
    """Something a person should hear about; `once` makes it go at most once to each hook."""

    kind: str  # approval_needed | storm | budget | breaker
    summary: str  # one sentence for a person
    details: dict[str, Any] = field(default_factory=dict)
    agent: str | None = None
    project: str | None = None
    job_id: str | None = None
    once: str | None = None


def approval_needed(
    *,
    job_id: str,
    agent: str,
    project: str,
    backend: str,
    estimate_micro_usd: int | None,
    level: str | None,
    expires_at: float | None,
) -> Event:
    """A job admitted into `pending_approval`: the message says how an operator approves or denies it."""
    cost = format_usd(estimate_micro_usd) if estimate_micro_usd is not None else "an unpriced"
    approve, deny = f"qpu-gateway approvals approve {job_id}", f"qpu-gateway approvals deny {job_id}"
    return Event(
        "approval_needed",
        f"Job {job_id} ({cost} on {backend}) from agent {agent} (project {project}) waits for approval "
        f"until {iso(expires_at)}. Approve: `{approve}`; deny: `{deny}`.",
        {
            "job_id": job_id,
            "agent": agent,
            "project": project,
            "backend": backend,
            "estimate_micro_usd": estimate_micro_usd,
            "approval_level": level,
            "expires_at": iso(expires_at),
            "approve": approve,
            "deny": deny,
        },
        agent=agent,
        project=project,
        job_id=job_id,
    )


def storm_alert(storm: Storm, *, project: str) -> Event:
    """An agent refused in bulk (policy/storm.py's alert)."""
    return Event(
        "storm",
        f"Agent {storm.agent} (project {project}) is probably looping: {storm.describe()}. "
        f"Look at it; `qpu-gateway agents pause {storm.agent}` stops it.",
        {
            "agent": storm.agent,
            "project": project,
            "refused": storm.refused,
            "window_s": storm.window_s,
            "codes": storm.codes,
        },
        agent=storm.agent,
        project=project,
    )


def breaker_changed(*, backend: str, state: str, process: str) -> Event:
    """A backend's breaker in one process opened (jobs for it wait) or closed again."""
    what = "opened: its jobs wait in the queue while it cools down" if state == "open" else "closed: its jobs run again"
    return Event(
        "breaker",
        f"The breaker of backend {backend} {what} (process {process}).",
        {"backend": backend, "state": state, "process": process},
    )


def budget_crossings(
    thresholds: tuple[Decimal, ...],
    caps: PeriodCaps,
    *,
    scope: str,
    who: str,
    project: str,
    periods: Mapping[str, str],
    used_after: Mapping[str, int],
    used_before: Mapping[str, int] | None = None,
) -> list[Event]:
    """The thresholds (fractions of a cost cap) that `used_after` (committed + reserved micro-dollars
    per period) reaches and `used_before` did not (None: whatever it was); each once per period."""
    events = []
    for period, key in periods.items():
        cap_usd: Decimal | None = getattr(caps, period)
        if cap_usd is None or cap_usd == 0:  # no cap, or one that admits nothing anyway
            continue
        cap = int(cap_usd * MICRO_USD_PER_USD)
        after, before = used_after.get(period, 0), None if used_before is None else used_before.get(period, 0)
        for threshold in thresholds:
            line = cap * threshold  # exact: Decimal times an integer
            if after < line or (before is not None and before >= line):
                continue
            events.append(
                Event(
                    "budget",
                    f"The {scope} {who} has used {float(threshold * 100):g}% of its {_PERIOD_WORD[period]} cost cap: "
                    f"{format_usd(after)} of {format_usd(cap)} committed and reserved ({key}).",
                    {
                        "scope": scope,
                        "name": who,
                        "period": period,
                        "period_key": key,
                        "threshold": str(threshold),
                        "used_micro_usd": after,
                        "cap_micro_usd": cap,
                    },
                    agent=who if scope == "agent" else None,
                    project=project,
                    once=f"budget:{scope}:{who}:{period}:{key}:{threshold}",
                )
            )
    return events


def outbox_rows(event: Event, notifications: Notifications, at: float) -> list[NewNotification]:
    """One row per hook that wants `event`, each with the body in that hook's format."""
    return [
        NewNotification(
            hook=hook.name,
            event=event.kind,
            body=body(event, hook.format, at),
            agent=event.agent,
            project=event.project,
            job_id=event.job_id,
            dedup_key=None if event.once is None else f"{hook.name}|{event.once}",
        )
        for hook in notifications.hooks_for(event.kind)
    ]


def body(event: Event, shape: str, at: float) -> str:
    """The JSON text sent: `{event, at, summary, details}`, or Slack's `{text, blocks}`."""
    if shape == "slack":
        text = f"[qpu-gateway] {event.kind}: {_slack_escape(event.summary)}"
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
        return json.dumps({"text": text, "blocks": blocks}, separators=(",", ":"))
    payload = {"event": event.kind, "at": iso(at), "summary": event.summary, "details": event.details}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>); names in a summary must stay plain text.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def sign(secret: bytes, timestamp: str, payload: bytes) -> str:
    """The signature header's value: `sha256=` and the hex HMAC-SHA256 of `timestamp.payload`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + payload, hashlib.sha256).hexdigest()


def retry_delay(failures: int, base_s: float, cap_s: float, rand: random.Random | None = None) -> float:
    """Seconds before the next try after `failures` failed ones: base doubling to the cap, each wait
    between half and all of it (jitter spreads retries of many rows, half keeps them from bunching at 0)."""
    step = min(cap_s, base_s * float(2 ** max(failures - 1, 0)))
    jitter: float = (rand or random).uniform(0, step / 2)
    return step / 2 + jitter


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


def shown_url(url: str) -> str:
    """`scheme://host/…`: a webhook URL may carry its secret in the path (Slack's do)."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    return f"{scheme}://{host}/…"


def without_urls(text: str) -> str:
    """`text` with every URL in it cut to `scheme://host/…` (an HTTP library's error may name the URL)."""
    return _URL.sub(lambda m: shown_url(m.group(0)), text)


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
