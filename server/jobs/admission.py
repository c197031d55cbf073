"""Admission: estimate a job and decide whether it runs, waits for a yes, or is refused.

The steps, in order: validate the circuits and the per-job caps; price the job; rate limits on
shots and backends; simulate-first; approval level; then, in one store transaction, quotas,
the loop guard, and the job row with its reservation and audit row. Every refusal is a coded
error naming the rule that fired.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from qpu_gateway.adapters import sdk_thread
from qpu_gateway.adapters.aer import BACKEND_ID as AER_BACKEND
from qpu_gateway.adapters.aer import AerAdapter
from qpu_gateway.adapters.base import Backend
from qpu_gateway.audit.chain import args_hash
from qpu_gateway.errors import (
    ApprovalDenied,
    ApprovalRequired,
    Conflict,
    GatewayError,
    InvalidArguments,
    SimulationRequired,
    UnsupportedBackend,
    from_refusal,
)
from qpu_gateway.jobs import models, pauses
from qpu_gateway.jobs.circuits import CircuitFacts, combined_fingerprint, inspect_and_load
from qpu_gateway.jobs.events import job_uri
from qpu_gateway.jobs.ratelimit import applicable
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import JobState
from qpu_gateway.keys import Principal
from qpu_gateway.policy.admission import JobFacts, check_job
from qpu_gateway.policy.approvals import approval_needed
from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import PRIORITY_RANK, Rules
from qpu_gateway.policy.guards import check_loop, check_priority
from qpu_gateway.policy.pricing import JobShape, estimate_cost, format_usd, price_for, to_micro_usd
from qpu_gateway.policy.quotas import DIMENSIONS, PERIODS, Amounts, cap_units, caps_of, check_quota
from qpu_gateway.store.records import AdmissionFacts, AuditEntry, JobRecord, LedgerTotals, NewJob
from qpu_gateway.telemetry import tracing

log = logging.getLogger(__name__)

Answer = Literal["not_asked", "accepted", "declined", "cancelled"]


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A submit_job or estimate_job call, as the agent asked for it."""

    sources: tuple[str, ...]
    backend: str
    shots: int
    name: str | None = None
    max_cost_usd: str | None = None
    idempotency_key: str | None = None
    priority: str = "normal"
    dry_run: bool = False

    @classmethod
    def from_args(
        cls,
        *,
        circuit: str | None,
        circuits: list[str] | None,
        backend: str,
        shots: int,
        max_cost_usd: str | float | None = None,
        **rest: Any,
    ) -> JobRequest:
        """The request as a tool received it: one of circuit/circuits, and max_cost_usd as exact dollars."""
        return cls(
            sources=circuit_sources(circuit, circuits),
            backend=backend,
            shots=shots,
            max_cost_usd=parse_money(max_cost_usd),
            **rest,
        )

    def payload(self) -> dict[str, object]:
        """What an idempotency key binds to: everything that changes what would run."""
        return {
            "circuits": list(self.sources),
            "backend": self.backend,
            "shots": self.shots,
            "dry_run": self.dry_run,
            "priority": self.priority,
            "max_cost_usd": self.max_cost_usd,
        }


def circuit_sources(circuit: str | None, circuits: list[str] | None) -> tuple[str, ...]:
    """Exactly one of `circuit` (one program) or `circuits` (a sweep) must be given."""
    if (circuit is None) == (circuits is None):
        raise InvalidArguments("Pass exactly one of `circuit` (one OpenQASM program) or `circuits` (a list).")
    sources = (circuit,) if circuit is not None else tuple(circuits or ())
    if not sources:
        raise InvalidArguments("`circuits` is empty; pass at least one OpenQASM program.")
    return sources


@dataclass(frozen=True, slots=True)
class Assessment:
    """A job checked and priced, before any reservation."""

    request: JobRequest
    rules: Rules
    target: Backend  # the backend asked for
    run_on: str  # where it will run (Aer for a dry run)
    facts: list[CircuitFacts]
    parsed: list[Any]  # the circuits as Qiskit parsed them, for Aer in this process
    cost_micro_usd: int | None  # None: the price is not known
    qpu_seconds: float
    refusal: Refusal | None  # a per-job cap the job breaks
    approval: Literal["person", "operator"] | None

    @property
    def amounts(self) -> Amounts:
        shots = self.request.shots * len(self.facts)
        return Amounts(cost=self.cost_micro_usd or 0, shots=shots, qpu=math.ceil(self.qpu_seconds * 1000))

    @property
    def fingerprint(self) -> str:
        return combined_fingerprint(self.facts)


Memo = dict[tuple[object, ...], "Assessment"]


async def assess(gw: Gateway, who: Principal, request: JobRequest, *, memo: Memo | None = None) -> Assessment:
    """Validate and price a job. A cap the job breaks is returned in `refusal`, not raised.

    With `memo` (one call's), a job already assessed in this call (by the approval question) is
    not parsed again.
    """
    key = (who.key_id, request.sources, request.backend, request.shots, request.dry_run, request.priority)
    if memo is not None and key in memo:
        return memo[key]
    assessment = await _assess(gw, who, request)
    if memo is not None:
        memo[key] = assessment
    return assessment


async def _assess(gw: Gateway, who: Principal, request: JobRequest) -> Assessment:
    rules = gw.policy.rules_for(agent=who.agent, project=who.project)
    if (refusal := check_priority(rules, request.priority)) is not None:
        raise from_refusal(refusal)
    target = await gw.providers.backend(request.backend) if len(request.backend) <= 200 else None
    if target is None or target.status == "unavailable":
        known = ", ".join(b.id for b in await gw.providers.backends() if b.status != "unavailable")
        raise UnsupportedBackend(f"Unknown or unavailable backend {request.backend[:200]!r}. Available: {known}.")
    early = check_job(
        rules,
        JobFacts(
            backend=request.backend,
            shots=request.shots,
            circuits=len(request.sources),
            max_qubits=0,
            max_depth=0,
            backend_qubits=None,
            backend_max_shots=target.max_shots,
        ),
    )
    if early is not None and early.rule in ("allowed_backends", "max_circuits", "max_shots"):
        raise from_refusal(early)
    qubit_cap = min(rules.max_qubits, target.qubits or rules.max_qubits)
    facts, parsed = await sdk_thread.run_sync(lambda: inspect_and_load(list(request.sources), max_qubits=qubit_cap))
    refusal = check_job(
        rules,
        JobFacts(
            backend=request.backend,
            shots=request.shots,
            circuits=len(facts),
            max_qubits=max(f.qubits for f in facts),
            max_depth=max(f.depth for f in facts),
            backend_qubits=target.qubits,
            backend_max_shots=target.max_shots,
        ),
    )
    run_on = AER_BACKEND if request.dry_run else request.backend
    shape = JobShape(
        circuits=len(facts),
        shots=request.shots,
        one_qubit_gates=sum(f.one_qubit_gates for f in facts),
        two_qubit_gates=sum(f.two_qubit_gates for f in facts),
        measurements=sum(f.measurements for f in facts),
    )
    cost = estimate_cost(price_for(gw.policy.prices, run_on), shape)
    approval = approval_needed(rules, cost.micro_usd)
    if isinstance(approval, Refusal):
        refusal, approval = refusal or approval, None
    return Assessment(
        request, rules, target, run_on, facts, parsed, cost.micro_usd, cost.qpu_seconds, refusal, approval
    )


# -- estimate ---------------------------------------------------------------------------------


async def estimate_job(gw: Gateway, who: Principal, request: JobRequest) -> models.Estimate:
    a = await assess(gw, who, request)
    refusal = a.refusal or _max_cost_refusal(a) or await _paused_backend(gw, a.run_on)
    quota_after: list[models.QuotaLine] = []
    if refusal is None:
        now = time.time()
        agent = await gw.store.ledger_totals("agent", who.agent, now)
        project = await gw.store.ledger_totals("project", who.project, now)
        quota_after = _quota_after(a.rules, agent, project, a.amounts)
        refusal = _quota_refusal(a.rules, agent, project, a.amounts)
    return _estimate_model(a, refusal, quota_after)


def _estimate_model(a: Assessment, refusal: Refusal | None, quota_after: list[models.QuotaLine]) -> models.Estimate:
    return models.Estimate(
        backend=a.request.backend,
        runs_on=a.run_on,
        circuits=len(a.facts),
        qubits=max(f.qubits for f in a.facts),
        depth=max(f.depth for f in a.facts),
        two_qubit_gates=sum(f.two_qubit_gates for f in a.facts),
        shots=a.request.shots,
        total_shots=a.amounts.shots,
        cost_micro_usd=a.cost_micro_usd,
        cost_usd=format_usd(a.cost_micro_usd) if a.cost_micro_usd is not None else "unknown",
        pricing_known=a.cost_micro_usd is not None,
        qpu_seconds=round(a.qpu_seconds, 3),
        approval=a.approval or "none",
        fingerprint=a.fingerprint,
        admitted=refusal is None,
        refusal=None
        if refusal is None
        else models.Refused(code=refusal.code, message=refusal.message, rule=refusal.rule),
        quota_after=quota_after,
    )


async def _paused_backend(gw: Gateway, backend: str) -> Refusal | None:
    """Whether an operator paused the backend the job would run on (submit_job checks it again
    inside its transaction)."""
    pause = await gw.store.pause_of("backend", backend)
    return None if pause is None else pauses.backend_paused(pause)


def _max_cost_refusal(a: Assessment) -> Refusal | None:
    if a.request.max_cost_usd is None:
        return None
    try:
        cap = to_micro_usd(a.request.max_cost_usd, "max_cost_usd")
    except ValueError as exc:
        raise InvalidArguments(f'{exc}. Give max_cost_usd as dollars, e.g. "2.50".') from None
    if a.cost_micro_usd is None:
        return Refusal(
            "limit_exceeded",
            "The price of this backend is not known, so the job cannot be held "
            f"under max_cost_usd={a.request.max_cost_usd}. Drop max_cost_usd or pick a priced backend.",
            rule="max_cost_usd",
        )
    if a.cost_micro_usd > cap:
        return Refusal(
            "limit_exceeded",
            f"The job is estimated at {format_usd(a.cost_micro_usd)}, above your "
            f"max_cost_usd of {format_usd(cap)}. Use fewer shots or circuits, or a cheaper backend.",
            rule="max_cost_usd",
        )
    return None


def _quota_refusal(rules: Rules, agent: LedgerTotals, project: LedgerTotals, job: Amounts) -> Refusal | None:
    return check_quota(rules.agent_quota, agent.usage(), job, whose="your") or check_quota(
        rules.project_quota, project.usage(), job, whose="your project's"
    )


def _quota_after(rules: Rules, agent: LedgerTotals, project: LedgerTotals, job: Amounts) -> list[models.QuotaLine]:
    lines = []
    for scope, quota, totals in (("agent", rules.agent_quota, agent), ("project", rules.project_quota, project)):
        usage = totals.usage()
        for dimension in DIMENSIONS:
            for period in PERIODS:
                cap = cap_units(caps_of(quota, dimension), period, dimension)
                if cap is not None:
                    left = cap - usage.used(period, dimension) - job.get(dimension)
                    lines.append(
                        models.QuotaLine(
                            scope=scope, dimension=dimension, period=period, limit=cap, remaining_after=left
                        )
                    )
    return lines


# -- submit -----------------------------------------------------------------------------------


async def submit_job(
    gw: Gateway, who: Principal, request: JobRequest, audit: AuditEntry, answer: Answer, memo: Memo | None = None
) -> models.Submitted:
    """Admit and durably queue a job, or hold it for approval, or refuse it with a code."""
    with tracing.span("job.admission", qpu_gateway__backend=request.backend) as span:
        try:
            submitted = await _submit_job(gw, who, request, audit, answer, memo)
        except GatewayError as exc:
            span.set(error__type=exc.code, qpu_gateway__job__id=exc.job_id)
            raise
        span.set(qpu_gateway__job__id=submitted.job_id, qpu_gateway__state=submitted.state)
        return submitted


async def _submit_job(
    gw: Gateway, who: Principal, request: JobRequest, audit: AuditEntry, answer: Answer, memo: Memo | None
) -> models.Submitted:
    if request.name is not None and len(request.name) > 200:
        raise InvalidArguments("`name` is limited to 200 characters.")
    if request.idempotency_key is not None and not 1 <= len(request.idempotency_key) <= 200:
        raise InvalidArguments("`idempotency_key` must be 1 to 200 characters.")
    a = await assess(gw, who, request, memo=memo)
    if request.idempotency_key is not None:  # a retry of an earlier submit: no new charge, no new limits
        earlier = await gw.store.job_by_idempotency_key(who.agent, request.idempotency_key)
        if earlier is not None:
            return _replay(earlier, request, a)
    if (refusal := a.refusal or _max_cost_refusal(a)) is not None:
        raise from_refusal(refusal)
    paced = not request.dry_run  # a dry run runs on Aer here, whatever the health of its target
    if paced:  # before the shot limits count it; taken for good below, by the store write
        gw.pacing.check(gw.policy.adaptive_admission, gw.workers.breakers, a.run_on)
    shot_rules = applicable(a.rules, "submit_job", cost="shots")
    if shot_rules:
        await gw.rate_limiter.enforce(shot_rules, who, backend=request.backend, cost=a.amounts.shots)
    needs_simulation = a.rules.simulate_first and not a.target.simulator and not request.dry_run
    if needs_simulation and not await gw.store.has_simulation(who.project, a.fingerprint):
        raise SimulationRequired(
            f"Your policy wants this circuit simulated before it runs on {request.backend}. Submit it first "
            "with dry_run=true (or on aer/simulator), wait for it to succeed, then submit again."
        )

    state, approved_by, level = JobState.QUEUED, None, a.approval
    if level == "person":
        if answer == "accepted":
            approved_by = f"person, through {who.agent}'s client"
        elif answer in ("declined", "cancelled"):
            raise ApprovalDenied(
                f"The person at your client {answer} the {format_usd(a.cost_micro_usd or 0)} job; nothing was "
                "reserved or queued. Ask them before trying again, or reduce the cost."
            )
        else:
            state = JobState.PENDING_APPROVAL
    elif level == "operator":
        state = JobState.PENDING_APPROVAL

    facts = a.facts
    job = NewJob(
        id=f"job_{secrets.token_hex(10)}",
        agent=who.agent,
        project=who.project,
        key_id=who.key_id,
        name=request.name,
        backend=a.run_on,
        shots=request.shots,
        circuits=request.sources,
        qubits=max(f.qubits for f in facts),
        depth=max(f.depth for f in facts),
        two_qubit_gates=sum(f.two_qubit_gates for f in facts),
        fingerprint=a.fingerprint,
        estimate_micro_usd=a.cost_micro_usd or 0,
        state=state,
        priority=PRIORITY_RANK[request.priority],
        idempotency_key=request.idempotency_key,
        payload_hash=_payload_hash(request),
        dry_run_of=request.backend if request.dry_run else None,
        simulator=request.dry_run or a.target.simulator,
        pricing_known=a.cost_micro_usd is not None,
        qpu_seconds_estimate=a.qpu_seconds,
        approval_level=level if state is JobState.PENDING_APPROVAL or approved_by else None,
        approval_expires_at=time.time() + a.rules.approval_ttl if state is JobState.PENDING_APPROVAL else None,
        approved_by=approved_by,
        trace_parent=tracing.current_traceparent(),
    )
    rules, amounts = a.rules, a.amounts

    def decide(facts: AdmissionFacts) -> Refusal | None:
        paused = pauses.admission_refusal(facts)
        if paused is not None:
            return paused
        loop = check_loop(rules, facts.repeats)
        if loop is not None:
            log.warning(
                "loop detected: %s submitted the same circuit to %s %d times",
                who.agent,
                job.backend,
                facts.repeats + 1,
                extra={"agent": who.agent, "fingerprint": job.fingerprint},
            )
            return loop
        return _quota_refusal(rules, facts.agent, facts.project, amounts)

    entry = AuditEntry(
        tool=audit.tool,
        decision="held" if state is JobState.PENDING_APPROVAL else "ok",
        agent=who.agent,
        project=who.project,
        key_id=who.key_id,
        args_hash=audit.args_hash,
        job_id=job.id,
        error_code="approval_required" if state is JobState.PENDING_APPROVAL else None,
        detail=f"approved by {approved_by}" if approved_by else None,
    )
    slot = gw.pacing.take(gw.policy.adaptive_admission, gw.workers.breakers, job.backend) if paced else None
    # Aer in this process may claim the job the moment it is stored: hand it the parsed circuits first.
    local = gw.providers.adapter_for(job.backend)
    keeper = local if isinstance(local, AerAdapter) and state is JobState.QUEUED else None
    if keeper is not None:
        keeper.keep_parsed(job.id, a.parsed)
    outcome: tuple[JobRecord, bool] | Refusal | None = None
    notify = gw.outbox.for_admission(job, rules, amounts.cost)  # its rows go in the admission's transaction
    try:
        outcome = await gw.store.admit(
            job, entry, time.time(), loop_window_s=rules.loop_guard.window_minutes * 60, decide=decide, notify=notify
        )
    finally:
        if outcome is None or isinstance(outcome, Refusal) or not outcome[1]:  # not queued after all
            if keeper is not None:
                keeper.forget_parsed(job.id)
            if slot is not None:
                gw.pacing.give_back(slot)
    if isinstance(outcome, Refusal):
        raise from_refusal(outcome)
    stored, created = outcome
    if not created:  # another call with the same key won the race
        return _replay(stored, request, a)
    gw.workers.wake()
    if notify is not None:
        gw.outbox.wake()
    await gw.events.announce(stored)
    if stored.state is JobState.PENDING_APPROVAL:
        who_approves = "an operator" if level == "operator" else "a person"
        raise ApprovalRequired(
            f"This {format_usd(stored.estimate_micro_usd) if stored.pricing_known else 'unpriced'} job needs "
            f"{who_approves}'s approval; it is held with its cost reserved until "
            f"{_when(stored.approval_expires_at)}. An operator approves with `qpu-gateway approvals approve "
            f"{stored.id}`. Poll get_job or wait_for_job for the outcome.",
            job_id=stored.id,
        )
    return _submitted(stored, _estimate_model(a, None, []), replayed=False)


def _replay(earlier: JobRecord, request: JobRequest, a: Assessment) -> models.Submitted:
    """The earlier job for a reused idempotency key, or `conflict` when the payload differs."""
    if earlier.payload_hash != _payload_hash(request):
        raise Conflict(
            f"idempotency_key {request.idempotency_key!r} was used for a different job ({earlier.id}). "
            "Use a new key for a new job.",
            job_id=earlier.id,
        )
    return _submitted(earlier, _estimate_model(a, None, []), replayed=True)


def _submitted(job: JobRecord, estimate: models.Estimate, *, replayed: bool) -> models.Submitted:
    return models.Submitted(
        job_id=job.id, state=job.state.value, uri=job_uri(job.id), estimate=estimate, idempotent_replay=replayed
    )


def _payload_hash(request: JobRequest) -> str:
    return args_hash(request.payload())


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else "it expires"


# -- the approval question, asked of the person at the client -------------------------------


async def approval_question(
    gw: Gateway, who: Principal, request: JobRequest, *, memo: Memo | None = None
) -> str | None:
    """The question to put to the person when the job needs their yes; None when it does not.

    Deterministic for the same job and budget, as the SDK's multi-round flow requires.
    """
    try:
        a = await assess(gw, who, request, memo=memo)
    except GatewayError:
        return None  # the tool body raises the same error with its code
    if a.refusal is not None or a.approval != "person" or _max_cost_refusal(a) is not None:
        return None
    if await _paused_backend(gw, a.run_on) is not None:
        return None  # nobody is asked to approve a job that would be refused
    totals = await gw.store.ledger_totals("agent", who.agent, time.time())
    lines = [
        q for q in _quota_after(a.rules, totals, totals, a.amounts) if q.scope == "agent" and q.dimension == "cost"
    ]
    budget = f" Your budget left after it: {format_usd(lines[0].remaining_after)} ({lines[0].period})." if lines else ""
    return (
        f"Agent '{who.agent}' wants to run {len(a.facts)} circuit(s) x {request.shots} shots on {request.backend}, "
        f"estimated at {format_usd(a.cost_micro_usd or 0)}.{budget} Approve this job?"
    )


def parse_money(value: str | float | None) -> str | None:
    """`max_cost_usd` as the agent passed it, kept as an exact decimal string."""
    if value is None:
        return None
    try:
        return str(Decimal(str(value)))
    except (InvalidOperation, ArithmeticError):
        raise InvalidArguments('max_cost_usd must be an amount in dollars, e.g. "2.50".') from None
