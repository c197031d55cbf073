"""Pauses: an agent's kill switch and a backend's drain, kept in the database so that every gateway
process applies them from its next call or claim.

A paused agent: every call it makes is refused `agent_paused` (the key check reads the pause in
the same query as the key), no job of it is admitted (checked again inside the admission
transaction), and its queued jobs are not claimed, so none reaches a provider, until an operator
resumes it. Its jobs a worker already holds (submitting or running) carry on to their end unless
the operator also cancels them (`agents pause --cancel-running`). Its held approvals stay held:
an operator may still approve (the job then waits, queued, for the resume) or deny them, and they
expire as usual.

A paused backend (a drain): its queued jobs are not claimed and no new job for it is admitted
(`backend_paused`: an agent is told at once rather than left waiting on a queue with no end in
sight); jobs already at the provider are polled to their end. A job of a paused agent or backend
that is at its provider already is still claimed after a crash, to be polled, never to be resent.
"""

from __future__ import annotations

import re
import time

from qpu_gateway.audit.operators import operator_entry
from qpu_gateway.errors import AgentPaused
from qpu_gateway.keys import validate_name
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.store import Store
from qpu_gateway.store.records import AdmissionFacts, Pause

KINDS = ("agent", "backend")
_BACKEND_ID = re.compile(r"\A[a-z][a-z0-9_\-]{0,31}/[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,127}\Z")


class PauseError(Exception):
    """The pause cannot be lifted (it is not paused); safe to show the operator."""


def validate_backend_id(value: str) -> str:
    if not _BACKEND_ID.match(value):
        raise ValueError("a backend id reads provider/name, e.g. ibm/ibm_torino or braket/sv1")
    return value


async def pause(store: Store, kind: str, name: str, *, by: str, reason: str | None) -> tuple[Pause, bool]:
    """Pause an agent or a backend; returns the pause in force and whether it is this one (False:
    it was paused already, and nothing changed)."""
    name = validate_name("agent", name) if kind == "agent" else validate_backend_id(name)
    reason = reason.strip()[:500] if reason and reason.strip() else None
    new = Pause(kind, name, reason, by, time.time())
    detail = f"{kind} {name} paused by operator {by}" + (f": {reason}" if reason else "")
    earlier = await store.pause(new, operator_entry(f"{kind}s.pause", by, detail=detail, agent=_agent(kind, name)))
    return (earlier, False) if earlier is not None else (new, True)


async def resume(store: Store, kind: str, name: str, *, by: str) -> Pause:
    """Lift a pause; raises PauseError when there is none."""
    entry = operator_entry(
        f"{kind}s.resume", by, detail=f"{kind} {name} resumed by operator {by}", agent=_agent(kind, name)
    )
    lifted = await store.resume(kind, name, time.time(), entry)
    if lifted is None:
        raise PauseError(f"{kind.capitalize()} {name!r} is not paused (`qpu-gateway {kind}s list` shows pauses).")
    return lifted


def _agent(kind: str, name: str) -> str | None:
    """The agent an audit row is about: a paused agent's rows are found with `audit tail --agent`."""
    return name if kind == "agent" else None


def _since(p: Pause) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(p.paused_at))


def _why(p: Pause) -> str:
    return f" ({p.reason})" if p.reason else ""


def agent_paused(p: Pause) -> AgentPaused:
    """What a paused agent is told on every call. The operator's name stays in the audit log."""
    return AgentPaused(
        f"Agent '{p.name}' is paused by an operator since {_since(p)}{_why(p)}. Every call is refused and its "
        f"queued jobs are held until an operator resumes it (`qpu-gateway agents resume {p.name}`). Stop calling "
        "and tell the person you work for."
    )


def backend_paused_message(p: Pause) -> str:
    return (
        f"Backend {p.name} is paused by an operator since {_since(p)}{_why(p)}. No new job for it is admitted, and "
        "jobs already queued for it wait until an operator resumes it. Pick another backend from list_backends, "
        "or try again later."
    )


def backend_paused(p: Pause) -> Refusal:
    return Refusal("backend_paused", backend_paused_message(p), rule="backend_paused")


def admission_refusal(facts: AdmissionFacts) -> Refusal | None:
    """The pauses admission reads inside its transaction: the agent's (it was paused after its key
    was checked) and the backend's."""
    if facts.agent_pause is not None:
        error = agent_paused(facts.agent_pause)
        return Refusal(error.code, error.message, rule="agent_paused")
    if facts.backend_pause is not None:
        return backend_paused(facts.backend_pause)
    return None
