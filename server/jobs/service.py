"""The gateway's operations, one function per tool: what an agent can do, with policy applied.

Handlers in `server.app` stay thin: they parse arguments, call one function here with the
caller's `Principal`, and return its model. Errors are raised as coded `GatewayError`s.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Awaitable, Callable
from typing import Literal

import anyio

from qpu_gateway.adapters import qasm
from qpu_gateway.adapters.aer import BACKEND_ID as DEFAULT_BACKEND
from qpu_gateway.errors import Conflict, InvalidArguments, NotFound
from qpu_gateway.jobs import cancellation, models
from qpu_gateway.jobs.cancellation import Canceller
from qpu_gateway.jobs.events import job_uri
from qpu_gateway.jobs.models import iso
from qpu_gateway.jobs.pauses import backend_paused_message
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.jobs.timeline import job_timeline
from qpu_gateway.keys import Principal
from qpu_gateway.policy.admission import backend_allowed
from qpu_gateway.policy.file import Policy, Quota, Rules
from qpu_gateway.policy.pricing import price_for
from qpu_gateway.policy.quotas import DIMENSIONS, PERIODS, Amounts, cap_units, caps_of
from qpu_gateway.store import Store
from qpu_gateway.store.records import JobRecord

_JOB_ID = re.compile(r"\Ajob_[0-9a-f]{20}\Z")
# Results bigger than this are summarised in get_job; the job resource always has every count.
MAX_INLINE_CIRCUITS = 20
MAX_INLINE_OUTCOMES = 64
MAX_LIST_LIMIT = 100
# The most values one completion/complete result may carry (MCP spec, server/utilities/completion).
MAX_COMPLETIONS = 100
Progress = Callable[[float, str], Awaitable[None]]


# -- backends ---------------------------------------------------------------------------------


async def list_backends(gw: Gateway, who: Principal) -> models.BackendList:
    rules = gw.policy.rules_for(agent=who.agent, project=who.project)
    paused = {p.name: p for p in await gw.store.pauses("backend")}
    infos = []
    for backend in await gw.providers.backends():
        price = price_for(gw.policy.prices, backend.id)
        allowed = backend_allowed(rules, backend.id)
        pause = paused.get(backend.id)
        infos.append(
            models.BackendInfo(
                id=backend.id,
                provider=backend.provider,
                name=backend.name,
                qubits=backend.qubits,
                simulator=backend.simulator,
                status=backend.status,
                max_shots=backend.max_shots,
                basis_gates=list(backend.basis_gates),
                breaker=gw.workers.breakers.state(backend.id) if gw.started else "closed",
                queue_depth=backend.queue_depth,
                price_model=price.describe() if price else "unknown",
                allowed=allowed,
                paused=pause is not None,
                reason=backend.reason
                or (backend_paused_message(pause) if pause else None)
                or (None if allowed else "not allowed by your policy"),
            )
        )
    return models.BackendList(backends=infos, default_backend=DEFAULT_BACKEND)


# -- reading jobs -----------------------------------------------------------------------------


async def owned_job(gw: Gateway, who: Principal, job_id: str) -> JobRecord:
    """The caller's job; another agent's job answers exactly like one that never existed."""
    job = None
    if _JOB_ID.match(job_id):
        # A job this process ended lately is served as it announced it: an ended job never changes.
        job = gw.events.settled(job_id) or await gw.store.get_job(job_id)
    if job is None or job.agent != who.agent:
        raise NotFound(f"No job {job_id[:64]!r} among yours. list_jobs shows the jobs you own.")
    return job


def _recently_changed_here(gw: Gateway, who: Principal, job_id: str) -> JobRecord | None:
    """The caller's job as this process last changed it, if it did lately (perhaps out of date)."""
    job = gw.events.recent(job_id) if _JOB_ID.match(job_id) else None
    return job if job is not None and job.agent == who.agent else None


def job_view(job: JobRecord, *, full: bool = False) -> models.JobView:
    result = None
    if job.result is not None:
        result = _result_view(job, full=full)
    error = None
    if job.error_code is not None:
        error = models.JobError(code=job.error_code, message=job.error_message or "")
    return models.JobView(
        job_id=job.id,
        name=job.name,
        backend=job.backend,
        state=job.state.value,
        terminal=job.state in TERMINAL,
        shots=job.shots,
        circuits=job.n_circuits,
        qubits=job.qubits,
        depth=job.depth,
        fingerprint=job.fingerprint,
        estimate_micro_usd=job.estimate_micro_usd,
        created_at=iso(job.created_at) or "",
        updated_at=iso(job.updated_at) or "",
        started_at=iso(job.started_at),
        finished_at=iso(job.finished_at),
        attempts=job.attempts,
        error=error,
        result=result,
        uri=job_uri(job.id),
    )


def _result_view(job: JobRecord, *, full: bool) -> models.JobResult:
    counts = [dict(c) for c in job.result or ()]
    too_big = len(counts) > MAX_INLINE_CIRCUITS or any(
        len(outcomes) > MAX_INLINE_OUTCOMES for circuit in counts for outcomes in circuit.values()
    )
    if full or not too_big:
        return models.JobResult(counts=counts)
    summary = [
        {
            register: dict(sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_INLINE_OUTCOMES])
            for register, outcomes in circuit.items()
        }
        for circuit in counts[:MAX_INLINE_CIRCUITS]
    ]
    return models.JobResult(counts=summary, truncated=True, full_result_uri=job_uri(job.id))


async def get_job(gw: Gateway, who: Principal, job_id: str, *, timeline: bool = False) -> models.JobView:
    job = await owned_job(gw, who, job_id)
    view = job_view(job)
    if timeline:
        view.timeline = await job_timeline(gw.store, job)
    return view


async def wait_for_job(
    gw: Gateway, who: Principal, job_id: str, timeout_s: float, progress: Progress
) -> models.JobView:
    """Return once the job is terminal or `timeout_s` passes, reporting each state change."""
    if not 0 <= timeout_s <= 600:
        raise InvalidArguments("timeout_s must be between 0 and 600 seconds; call again to keep waiting.")
    # A job this process changed lately (it admitted or ran it) is waited on from that record, with
    # no read: were it out of date (another process moved the job since), the wait hears of the
    # change or reads the job within the poll interval. An answer that has not ended is always read.
    job = _recently_changed_here(gw, who, job_id) if timeout_s > 0 else None
    read = job is None or job.state in TERMINAL
    if job is None:
        job = await owned_job(gw, who, job_id)
    deadline = anyio.current_time() + timeout_s
    changes = 0
    last_state: JobState | None = None
    gw.events.watch(job.id, job.version)
    try:
        while True:
            if job.state != last_state:
                changes += 1
                last_state = job.state
                await progress(changes, f"job {job.id} is {job.state.value}")
            remaining = deadline - anyio.current_time()
            if job.state in TERMINAL or remaining <= 0:
                if not read:
                    job = await owned_job(gw, who, job_id)
                return job_view(job)
            changed = gw.events.changed_event(job.id)
            # Re-read at least every poll interval: another process may have moved the job.
            with anyio.move_on_after(min(remaining, max(gw.config.poll_interval_s, 0.05))):
                await changed.wait()
            # A change made here comes with the job as stored; another process's is read.
            job = gw.events.latest(job.id, newer_than=job.version) or await owned_job(gw, who, job_id)
            read = True
    finally:
        gw.events.unwatch(job.id)


async def cancel_job(gw: Gateway, who: Principal, job_id: str) -> models.JobView:
    job = await owned_job(gw, who, job_id)
    if job.state in TERMINAL:
        raise Conflict(f"Job {job.id} already ended ({job.state.value}); there is nothing to cancel.", job_id=job.id)
    done = await cancellation.cancel_job(
        gw.store, job, Canceller.agent(who), providers=gw.providers, workers=gw.workers, events=gw.events
    )
    if done is None:  # it ended between our read and the update
        latest = await owned_job(gw, who, job_id)
        raise Conflict(f"Job {job.id} already ended ({latest.state.value}).", job_id=job.id)
    return job_view(done.job)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if text.startswith("seq:") and len(text) <= 24:
            seq = int(text[4:])
            if 0 <= seq < 2**63:
                return seq
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    raise InvalidArguments("`cursor` is not one list_jobs returned; omit it to start from the newest job.")


async def list_jobs(gw: Gateway, who: Principal, state: str | None, limit: int, cursor: str | None) -> models.JobPage:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise InvalidArguments(f"limit must be between 1 and {MAX_LIST_LIMIT}.")
    try:
        state_filter = JobState(state) if state is not None else None
    except ValueError:
        raise InvalidArguments(f"Unknown state; use one of {', '.join(s.value for s in JobState)}.") from None
    before = _decode_cursor(cursor) if cursor else None
    rows = await gw.store.list_jobs(agent=who.agent, state=state_filter, limit=limit + 1, before_seq=before)
    page = rows[:limit]
    jobs = [
        models.JobSummary(
            job_id=j.id,
            name=j.name,
            backend=j.backend,
            state=j.state.value,
            shots=j.shots,
            circuits=j.n_circuits,
            created_at=iso(j.created_at) or "",
            uri=job_uri(j.id),
        )
        for j in page
    ]
    return models.JobPage(jobs=jobs, next_cursor=_encode_cursor(page[-1].seq) if len(rows) > limit else None)


async def job_id_completions(gw: Gateway, who: Principal, prefix: str) -> tuple[list[str], bool]:
    """The caller's own job ids that start with `prefix`, newest first, and whether there are more."""
    ids = await gw.store.job_ids(who.agent, prefix[:64], MAX_COMPLETIONS + 1)
    return ids[:MAX_COMPLETIONS], len(ids) > MAX_COMPLETIONS


async def backend_completions(gw: Gateway, who: Principal, prefix: str) -> tuple[list[str], bool]:
    """Backend ids that start with `prefix`, that the caller's policy allows and that can take jobs."""
    rules = gw.policy.rules_for(agent=who.agent, project=who.project)
    ids = [
        backend.id
        for backend in await gw.providers.backends()
        if backend.id.startswith(prefix) and backend.status != "unavailable" and backend_allowed(rules, backend.id)
    ]
    return ids[:MAX_COMPLETIONS], len(ids) > MAX_COMPLETIONS


async def quota_usage(
    store: Store, rules: Rules, *, agent: str, project: str
) -> tuple[list[models.QuotaUse], dict[str, tuple[int, int]]]:
    """Per scope, dimension and period: limit, committed, reserved, remaining; and (queued, running) counts."""
    now = time.time()
    lines: list[models.QuotaUse] = []
    counts: dict[str, tuple[int, int]] = {}
    scopes: tuple[tuple[Literal["agent", "project"], Quota, str], ...] = (
        ("agent", rules.agent_quota, agent),
        ("project", rules.project_quota, project),
    )
    for scope, quota, who_id in scopes:
        totals = await store.ledger_totals(scope, who_id, now)
        counts[scope] = (totals.queued_jobs, totals.running_jobs)
        for dimension in DIMENSIONS:
            for period in PERIODS:
                cap = cap_units(caps_of(quota, dimension), period, dimension)
                committed = Amounts(*totals.committed.get(period, (0, 0, 0))).get(dimension)
                reserved = Amounts(*totals.reserved.get(period, (0, 0, 0))).get(dimension)
                lines.append(
                    models.QuotaUse(
                        scope=scope,
                        dimension=dimension,
                        period=period,
                        limit=cap,
                        committed=committed,
                        reserved=reserved,
                        remaining=None if cap is None else cap - committed - reserved,
                    )
                )
    return lines, counts


async def get_usage(gw: Gateway, who: Principal) -> models.Usage:
    rows = await gw.store.usage_by_state(who.agent)
    rules = gw.policy.rules_for(agent=who.agent, project=who.project)
    lines, counts = await quota_usage(gw.store, rules, agent=who.agent, project=who.project)
    return models.Usage(
        agent=who.agent,
        project=who.project,
        by_state=[models.StateCount(state=r.state.value, jobs=r.jobs, shots=r.shots) for r in rows],
        total_jobs=sum(r.jobs for r in rows),
        total_shots=sum(r.shots for r in rows),
        quotas=lines,
        queued_jobs=counts["agent"][0],
        running_jobs=counts["agent"][1],
        queued_jobs_limit=rules.agent_quota.queued_jobs,
        running_jobs_limit=rules.agent_quota.running_jobs,
    )


async def policy_view(gw: Gateway, who: Principal) -> models.PolicyView:
    view = effective_policy(gw.policy, agent=who.agent, project=who.project, scopes=who.scopes)
    view.consistency = await gw.processes.consistency()
    return view


def effective_policy(policy: Policy, *, agent: str, project: str, scopes: frozenset[str]) -> models.PolicyView:
    """The rules that apply to one agent, as the agent (qpu://policy) and operators (policy show) see them."""
    rules = policy.rules_for(agent=agent, project=project)
    return models.PolicyView(
        agent=agent,
        project=project,
        scopes=sorted(scopes),
        max_source_kb=qasm.MAX_SOURCE_BYTES // 1024,
        **rules.model_dump(mode="json"),
    )
