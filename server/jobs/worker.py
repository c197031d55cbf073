"""Workers: claim queued jobs with a lease, run them through their adapter, settle the outcome.

The verbs are the queue's: `claim` (a guarded UPDATE any process may win, never two),
`heartbeat` (extend the lease every lease/3 while the job runs), `settle` (store the result or
the failure, clear the lease). A worker that stops heartbeating (its process died) loses its
jobs to any other process once the lease lapses.

Two bounds keep a job from going on for ever. A failure of the gateway itself (anything the
adapter did not classify: our bug, an SDK that would not import) is not the job's: the job runs
again after a growing wait, and fails `internal_error` only after `internal_retry_max` such
failures. And a job at its provider longer than its policy's `max_wall_clock` is cancelled there
and fails `timeout`, its reservation settled by what the provider says the job used.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import backoff

from qpu_gateway.adapters.base import (
    Adapter,
    AdapterError,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    QuotaError,
    Result,
    TransientError,
    Usage,
)
from qpu_gateway.config import Config
from qpu_gateway.jobs import cancellation
from qpu_gateway.jobs.breaker import Breakers
from qpu_gateway.jobs.events import JobEvents
from qpu_gateway.jobs.providers import Providers
from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.policy.file import Policy
from qpu_gateway.policy.pricing import cost_of_usage, format_usd, price_for
from qpu_gateway.policy.quotas import may_start
from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import AuditEntry, Candidate, JobRecord
from qpu_gateway.telemetry import tracing
from qpu_gateway.telemetry.metrics import GatewayMetrics, ProviderCall

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_START_S = 0.05
POLL_MAX_S = 5.0
# Jobs claimed in one transaction at most: a queue of many is taken in a few writes, not one each.
CLAIM_BATCH = 32
# The longest wait before a job hit by an internal failure runs again (the waits double from
# Config.internal_retry_base_s up to this).
INTERNAL_RETRY_MAX_WAIT_S = 300.0


class Workers:
    def __init__(
        self,
        config: Config,
        store: Store,
        providers: Providers,
        events: JobEvents,
        policy: Callable[[], Policy],
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or GatewayMetrics()
        self.policy = policy
        self.store = store
        self.providers = providers
        self.events = events
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._wake = anyio.Event()
        self._in_flight: dict[str, anyio.CancelScope] = {}
        self._cancelled: set[str] = set()  # held here and cancelled (here or elsewhere): being stopped
        self._per_backend: Counter[str] = Counter()
        # The last claim may have left claimable jobs behind: a backend was at its cap here, an
        # agent or project at its running cap, or the batch was full. A finished job then frees a
        # slot one of them may take, so the dispatcher looks at once; otherwise the last claim took
        # everything there was, and new work wakes it (a submit here) or is found by its poll.
        self._backlog = False
        self.breakers = Breakers(threshold=config.breaker_threshold, cooldown_s=config.breaker_cooldown_s)
        self.on_settled: Callable[[JobRecord], Awaitable[None]] | None = None  # a job this worker ended

    def wake(self) -> None:
        """Look for work now (a job was just queued here) instead of at the next poll."""
        self._wake.set()

    def stop_local(self, job_id: str) -> bool:
        """Stop running `job_id` in this process (it was cancelled); True if it was running here."""
        scope = self._in_flight.get(job_id)
        if scope is not None:
            scope.cancel()
        return scope is not None

    def holds(self, job_id: str) -> bool:
        """Whether a worker of this process runs `job_id` now."""
        return job_id in self._in_flight

    async def stop_cancelled(self, job: JobRecord) -> None:
        """`job`, held here, was cancelled (by its agent or an operator, in any process): stop it and
        cancel it at its provider.

        A submission to a provider that is in flight is not abandoned: the provider may be accepting
        the job, and an abandoned call would leave that run going unseen. It is let finish (its
        retries give up), and `_drive`, finding the job cancelled, cancels what the provider took.
        """
        if job.id not in self._in_flight or job.id in self._cancelled:
            return
        self._cancelled.add(job.id)
        adapter = self.providers.adapter_for(job.backend)
        if job.provider_ref is None and adapter is not None and not getattr(adapter, "runs_in_submit", False):
            return
        self.stop_local(job.id)
        if job.provider_ref is not None and adapter is not None:
            await cancellation.cancel_at_provider(adapter, job.id, job.provider_ref)

    async def run(self) -> None:
        """Dispatch and heartbeat until cancelled; on the way out, hand every held job back."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._cancel_watch_loop)
                await self._dispatch_loop(tg)
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    handed = await self.store.hand_back(self.owner, time.time())
                except StoreError as exc:
                    log.error("could not hand jobs back on shutdown: %s", exc)
                else:
                    if handed:
                        log.info("handed %d job(s) back to the queue", handed)

    async def _dispatch_loop(self, tg: anyio.abc.TaskGroup) -> None:
        while True:
            self._wake = anyio.Event()
            jobs = await self._claim()
            for job in jobs:
                scope = anyio.CancelScope()
                self._in_flight[job.id] = scope
                self._per_backend[job.backend] += 1
                tg.start_soon(self._run, job, scope)
            if any(self._per_backend[job.backend] >= self._in_flight_cap(job.backend) for job in jobs):
                self._backlog = True  # a backend filled up: more of its jobs may be waiting
            if len(jobs) == CLAIM_BATCH:
                continue  # a full batch: there may be more (fewer means none was left to take)
            with anyio.move_on_after(self.config.poll_interval_s):
                await self._wake.wait()

    async def _claim(self) -> list[JobRecord]:
        """Claim, in one transaction, as many jobs as the backends' caps leave room for here."""
        busy = [b for b, n in self._per_backend.items() if n >= self._in_flight_cap(b)]
        busy += self.breakers.blocked()
        self._backlog = bool(busy)
        try:
            jobs = await self.store.claim_many(
                self.providers.adapters,
                busy,
                self.owner,
                self.config.lease_s,
                time.time(),
                may_run=self._may_run,
                limit=CLAIM_BATCH,
                room=self._room,
            )
        except StoreError as exc:
            log.warning("cannot claim jobs: %s", exc)
            return []
        for job in jobs:
            self.breakers.started(job.backend)
            await self.events.announce(job)
        return jobs

    def _room(self, backend: str) -> int:
        """How many more of a backend's jobs this process may take now: one probe when half-open."""
        if self.breakers.state(backend) == "half_open":
            self._backlog = True  # one probe only: the backend's other jobs wait for its outcome
            return 1
        return self._in_flight_cap(backend) - self._per_backend[backend]

    def _in_flight_cap(self, backend: str) -> int:
        """How many of a backend's jobs this process runs at once: more for an adapter that runs
        several jobs in one call (Aer's micro-batches), so they have jobs to share a call."""
        adapter = self.providers.adapter_for(backend)
        return self.config.per_backend_concurrency * max(1, getattr(adapter, "jobs_at_once", 1))

    def _may_run(self, job: Candidate, agent_running: int, project_running: int) -> bool:
        """The running-jobs caps of the job's agent and project (quota `running_jobs`)."""
        rules = self.policy().rules_for(agent=job.agent, project=job.project)
        if may_start(rules.agent_quota, agent_running) and may_start(rules.project_quota, project_running):
            return True
        self._backlog = True  # held back until one of its agent's or project's jobs ends
        return False

    async def _heartbeat_loop(self) -> None:
        while True:
            await anyio.sleep(self.config.lease_s / 3)
            held = list(self._in_flight)
            if not held:
                continue
            try:
                still = await self.store.heartbeat(held, self.owner, time.time() + self.config.lease_s)
            except StoreError as exc:
                log.warning("heartbeat failed: %s", exc)
                continue
            for job_id in set(held) - still - self._cancelled:
                # Cancelled, or the lease went to another worker: stop without settling.
                await self._lost(job_id)

    async def _cancel_watch_loop(self) -> None:
        """Notice within a poll interval that a job held here was cancelled elsewhere (another
        process serving its agent, or an operator's `jobs cancel`), rather than at the next heartbeat."""
        while True:
            await anyio.sleep(self.config.poll_interval_s)
            held = [job_id for job_id in self._in_flight if job_id not in self._cancelled]
            if not held:
                continue
            try:
                versions = await self.store.job_versions(held)
            except StoreError as exc:
                log.info("cannot check held jobs for cancels: %s", exc)
                continue
            for job_id, (_, state) in versions.items():
                if state is JobState.CANCELLED:
                    await self._lost(job_id)

    async def _lost(self, job_id: str) -> None:
        """A job held here that this worker no longer holds in the store: cancelled, or taken over."""
        try:
            job = await self.store.get_job(job_id)
        except StoreError as exc:
            log.warning("cannot read job %s, stopping it here: %s", job_id, exc)
            job = None
        if job is not None and job.state is JobState.CANCELLED:
            await self.stop_cancelled(job)
        else:
            self.stop_local(job_id)

    async def _run(self, job: JobRecord, scope: anyio.CancelScope) -> None:
        try:
            with scope, tracing.job_run(job, time.time()):
                await self._drive(job)
        except StoreError as exc:
            # The database refused a write (busy, read-only, full), so the job's progress was not
            # saved. It is left to its lease: once that lapses, a worker claims it again and
            # resubmits under the same job id, which the provider recognises.
            log.warning("job %s paused until its lease lapses: %s", job.id, exc)
        except Exception as exc:
            log.exception("worker failed on job %s", job.id)
            with anyio.CancelScope(shield=True):
                try:
                    await self._internal_failure(job, exc)
                except StoreError as store_exc:
                    log.error("could not record the failure of job %s: %s", job.id, store_exc)
        finally:
            self._in_flight.pop(job.id, None)
            self._cancelled.discard(job.id)
            self._per_backend[job.backend] -= 1
            if self._per_backend[job.backend] <= 0:
                del self._per_backend[job.backend]
            if self._backlog:
                self.wake()

    async def _drive(self, job: JobRecord) -> None:
        adapter = self.providers.adapter_for(job.backend)
        if adapter is None:
            await self._settle_failure(job, "unsupported_backend", f"No adapter serves {job.backend} here.")
            return
        spec = JobSpec(job_id=job.id, backend=job.backend, circuits=job.circuits, shots=job.shots)
        try:
            if job.provider_ref is None:
                ref = await self._with_retries(job, "submit", lambda: adapter.submit(spec))
                if getattr(adapter, "runs_in_submit", False):
                    # It has run already: one write stores the result (none if it was cancelled meanwhile).
                    result = await self._with_retries(job, "result", lambda: adapter.result(ref))
                    await self._settle_success(job, result, provider_ref=ref.provider_job_id)
                    return
                moved = await self._move(
                    job, JobState.RUNNING, provider_ref=ref.provider_job_id, submitted_at=time.time()
                )
                if moved is None:  # cancelled while it was being submitted
                    await cancellation.cancel_at_provider(adapter, job.id, ref.provider_job_id)
                    return
                job = moved
            else:
                ref = ProviderRef(job.provider_ref)
            outcome = await self._poll(job, adapter, ref)
            if outcome is None:
                return
            await self._settle_success(job, outcome)
        except QuotaError as exc:
            await self._settle_failure(job, "quota_exhausted", f"The provider's quota is exhausted: {exc}{_said(exc)}")
        except PermanentError as exc:
            await self._settle_failure(job, "provider_error", f"{exc}{_said(exc)}")
        except TransientError as exc:
            if self.breakers.is_open(job.backend):
                # The backend's breaker opened while this job retried: it waits for the backend
                # to recover instead of failing (queued again if the provider never took it;
                # otherwise left for a later poll).
                current = await self.store.get_job(job.id)
                requeue = current is None or current.provider_ref is None
                if await self.store.release_lease(job.id, self.owner, requeue=requeue, now=time.time()):
                    released = await self.store.get_job(job.id)
                    if released is not None:
                        await self.events.announce(released)
                return
            tried = await self.store.get_job(job.id)
            attempts = tried.attempts if tried is not None else self.config.retry_max_tries
            await self._settle_failure(job, "provider_error", f"Gave up after {attempts} attempt(s): {exc}{_said(exc)}")

    async def _poll(self, job: JobRecord, adapter: Adapter, ref: ProviderRef) -> Result | None:
        delay = POLL_START_S
        # A job stored before submitted_at existed is timed from its first claim.
        since = job.submitted_at or job.started_at or time.time()
        while True:
            # Read each round: a policy edit applies to jobs already waiting.
            cap_s = self.policy().rules_for(agent=job.agent, project=job.project).wall_clock_s(job.backend)
            left = since + cap_s - time.time()
            if left <= 0:
                return await self._time_out(job, adapter, ref, cap_s)
            status = await self._with_retries(job, "status", lambda: adapter.status(ref))
            if status.state is ProviderState.DONE:
                return await self._with_retries(job, "result", lambda: adapter.result(ref))
            if status.state is ProviderState.FAILED:
                raise PermanentError(status.message or "the provider reports the job failed")
            if status.state is ProviderState.CANCELLED:
                await self._move(
                    job, JobState.CANCELLED, finished_at=time.time(), lease_owner=None, cancelled_by="provider"
                )
                return None
            if status.state is ProviderState.UNKNOWN:
                # The run was lost with the process that held it (local simulators only): queue again.
                if await self.store.release_lease(job.id, self.owner, requeue=True, now=time.time()):
                    requeued = await self.store.get_job(job.id)
                    if requeued is not None:
                        await self.events.announce(requeued)
                    self.wake()
                return None
            await anyio.sleep(min(delay, max(left, 0.0)))
            delay = min(delay * 2, POLL_MAX_S)

    async def _time_out(self, job: JobRecord, adapter: Adapter, ref: ProviderRef, cap_s: int) -> Result | None:
        """Past the wall-clock cap: cancel the job at its provider and end it `timeout`, settled by what
        the provider says it used. Returns the result instead if the job finished before the cancel."""
        log.warning("job %s passed its wall-clock cap of %d s on %s; cancelling it there", job.id, cap_s, job.backend)
        not_cancelled = None
        try:
            await self._with_retries(job, "cancel", lambda: adapter.cancel(ref))
        except AdapterError as exc:
            not_cancelled = str(exc)[:200]
            log.warning("job %s: the provider refused the cancel: %s", job.id, exc)
        with contextlib.suppress(AdapterError):
            status = await self._with_retries(job, "status", lambda: adapter.status(ref))
            if status.state is ProviderState.DONE:  # it finished just before the cancel reached it
                return await self._with_retries(job, "result", lambda: adapter.result(ref))
        usage: Usage | None = None
        try:
            usage = await self._with_retries(job, "usage", lambda: adapter.usage(ref))
        except AdapterError as exc:
            log.warning("job %s: the provider did not say what the cancelled job used: %s", job.id, exc)
        cost, qpu_seconds, charged = self._charge_for(job, usage)
        where = (
            f"it was cancelled at the provider; {charged}"
            if not_cancelled is None
            else f"the provider refused to cancel it ({not_cancelled}), so it may still run; {charged}"
        )
        await self._settle_failure(
            job,
            "timeout",
            f"The job was at {job.backend} longer than its wall-clock cap of {_duration(cap_s)} "
            f"(policy max_wall_clock); {where}.",
            charge=cost is None or cost > 0 or bool(qpu_seconds),
            actual_cost_micro_usd=cost,
            actual_qpu_seconds=qpu_seconds,
        )
        return None

    def _charge_for(self, job: JobRecord, usage: Usage | None) -> tuple[int | None, float | None, str]:
        """(cost to commit, QPU seconds, what the agent is told) for a job cancelled at its provider.

        A cost of None means the provider did not say: the estimate is committed, since the job
        may have run and the provider bills what ran.
        """
        unknown = f"so its estimate ({format_usd(job.estimate_micro_usd)}) is charged"
        if usage is None:
            return None, None, f"the provider did not say what it used, {unknown}"
        if usage.cost_micro_usd is not None:
            return usage.cost_micro_usd, usage.qpu_seconds, f"the provider reports {format_usd(usage.cost_micro_usd)}"
        qpu = usage.qpu_seconds
        if qpu == 0:
            return 0, 0.0, "it used no QPU time, so nothing is charged"
        if qpu is not None:
            cost = cost_of_usage(price_for(self.policy().prices, job.backend), qpu)
            if cost is None:
                return None, qpu, f"it used {qpu:g} s of QPU time on a backend not priced by time, {unknown}"
            return cost, qpu, f"it used {qpu:g} s of QPU time: {format_usd(cost)} at the list price"
        if usage.circuits_run is not None:
            cost = math.ceil(job.estimate_micro_usd * usage.circuits_run / max(job.n_circuits, 1))
            return cost, None, f"{usage.circuits_run} of its {job.n_circuits} circuit(s) ran: {format_usd(cost)}"
        return None, None, f"the provider did not say what it used, {unknown}"

    async def _internal_failure(self, job: JobRecord, exc: Exception) -> None:
        """A failure of the gateway itself, not of the job or its provider: run the job again later.

        The waits double from `internal_retry_base_s` (so a job that always trips the same bug
        does not loop hot), and after `internal_retry_max` failures the job fails `internal_error`.
        """
        failures = job.internal_failures + 1
        limit = self.config.internal_retry_max
        kind = type(exc).__name__  # the type only: an exception's text may quote anything
        if failures >= limit:
            current = await self.store.get_job(job.id)
            provider_ref = current.provider_ref if current is not None else None
            adapter = self.providers.adapter_for(job.backend)
            if provider_ref is not None and adapter is not None:
                with contextlib.suppress(Exception):  # best effort: the gateway is failing on this job
                    await adapter.cancel(ProviderRef(provider_ref))
            at_provider = provider_ref is not None
            charged = (
                "it was cancelled at its provider, and its estimate is charged since the provider may have run it"
                if at_provider
                else "nothing was charged"
            )
            await self._settle_failure(
                job,
                "internal_error",
                f"The gateway failed {failures} times while running this job (last: {kind}) and stopped trying; "
                f"{charged}. The fault is the gateway's, not the circuit's: tell its operator (the log has details).",
                charge=at_provider,
            )
            return
        wait = min(INTERNAL_RETRY_MAX_WAIT_S, self.config.internal_retry_base_s * 2 ** (failures - 1))
        until = time.time() + wait
        message = (
            f"The gateway failed while running this job ({kind}); it runs again from "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(until))} (failure {failures} of at most {limit})."
        )
        moved = await self.store.retry_later(job.id, self.owner, time.time(), until=until, message=message)
        if moved is not None:
            log.warning("job %s runs again in %.0f s after internal failure %d of %d", job.id, wait, failures, limit)
            await self.events.announce(moved)

    async def _with_retries(self, job: JobRecord, what: ProviderCall, call: Callable[[], Awaitable[T]]) -> T:
        """Retry `TransientError` with exponential backoff and full jitter, within the caps.

        Each retry is a row of the job's timeline (the failed call, its provider code, the wait);
        a retried submission also adds one to the job's attempts (the claim counted the first).
        """
        tries = 0
        failed: tuple[AdapterError, float] | None = None  # the last failure and the wait after it

        def waiting(details: Any) -> None:
            nonlocal failed
            if failed is not None:
                failed = (failed[0], float(details.get("wait", 0.0)))
            self.metrics.retry(job.backend, what)

        @backoff.on_exception(
            backoff.expo,
            TransientError,
            max_tries=self.config.retry_max_tries,
            max_time=self.config.retry_max_time_s,
            jitter=backoff.full_jitter,
            factor=self.config.retry_base_s,
            max_value=30,
            giveup=lambda _: self.breakers.is_open(job.backend) or job.id in self._cancelled,
            on_backoff=[
                lambda details: log.info(
                    "transient provider failure, retrying",
                    extra={"job_id": job.id, "try": details["tries"], "wait_s": round(details.get("wait", 0), 3)},
                ),
                waiting,
            ],
            logger=None,
        )
        async def attempt() -> T:
            nonlocal tries, failed
            tries += 1
            if failed is not None:
                entry = _retry_entry(job, what, tries, *failed)
                if what == "submit":
                    await self.store.record_attempt(job.id, self.owner, entry)
                else:
                    await self.store.append_audit(entry, time.time())
                failed = None
            self.metrics.provider_call(job.backend, what)
            with tracing.provider_span(job, what, tries) as span:
                try:
                    value = await call()
                except AdapterError as exc:
                    self.metrics.provider_error(job.backend, exc.kind, exc.code)
                    span.failed(exc.kind, exc.code)
                    if isinstance(exc, TransientError):
                        self.breakers.failure(job.backend)
                        failed = (exc, 0.0)
                    raise
            self.breakers.success(job.backend)
            return value

        result: T = await attempt()
        return result

    async def _move(self, job: JobRecord, state: JobState, **fields: Any) -> JobRecord | None:
        with tracing.span("job.settle" if state in TERMINAL else f"job.{state.value}", qpu_gateway__state=state.value):
            moved = await self.store.transition(job.id, state, time.time(), owner=self.owner, fields=fields, held=job)
        if moved is not None:
            await self.events.announce(moved)
            if moved.state is JobState.SUCCEEDED and self.on_settled is not None:
                await self.on_settled(moved)
        return moved

    async def _settle_success(self, job: JobRecord, result: Result, **fields: Any) -> None:
        # The ledger commits what the provider reports; where it reports nothing, the estimate.
        # A provider that reports QPU time but no cost (IBM) is charged its time at the list price.
        cost = result.cost_micro_usd
        if cost is None and result.qpu_seconds is not None:
            cost = cost_of_usage(price_for(self.policy().prices, job.backend), result.qpu_seconds)
        await self._move(
            job,
            JobState.SUCCEEDED,
            result=[dict(c) for c in result.counts],
            finished_at=time.time(),
            lease_owner=None,
            lease_expires=None,
            actual_cost_micro_usd=cost,
            actual_qpu_seconds=result.qpu_seconds,
            **fields,
        )

    async def _settle_failure(
        self, job: JobRecord, code: str, message: str, *, charge: bool = False, **fields: Any
    ) -> None:
        """End the job `failed`; its reservation is released, or committed with `charge` (at the
        actual figures in `fields`, else the estimate)."""
        with tracing.span("job.settle", qpu_gateway__state="failed", error__type=code):
            moved = await self.store.transition(
                job.id,
                JobState.FAILED,
                time.time(),
                owner=self.owner,
                fields={
                    "error_code": code,
                    "error_message": message,
                    "finished_at": time.time(),
                    "lease_owner": None,
                    "lease_expires": None,
                    **fields,
                },
                audit=AuditEntry(tool="job.failed", decision="event", error_code=code, detail=message[:500]),
                charge=charge,
                held=job,
            )
        if moved is not None:
            await self.events.announce(moved)


def _said(exc: AdapterError) -> str:
    """The provider's code for a failure, for a message, where it gave one."""
    return f" (provider code {exc.code})" if exc.code else ""


def _retry_entry(job: JobRecord, what: ProviderCall, tries: int, failure: AdapterError, wait_s: float) -> AuditEntry:
    """The timeline row of one retry: which call failed how, and how long the worker waited."""
    code = f", provider code {failure.code}" if failure.code else ""
    return AuditEntry(
        tool="job.retry",
        decision="event",
        agent=job.agent,
        project=job.project,
        job_id=job.id,
        detail=f"{what} try {tries - 1} failed (transient{code}): {str(failure)[:200]}; "
        f"try {tries} after {wait_s:.2f} s",
    )


def _duration(seconds: int) -> str:
    """`86400` -> "24h", `90` -> "90s": as the policy file writes durations."""
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
