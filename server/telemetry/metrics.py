"""Prometheus metrics: what this process counted, and the gateway's state read from the database.

Two kinds. Counters and histograms of what happened here (calls, admissions, provider calls and
errors, retries, job ends, spend, rate-limit refusals, storm alerts) live in one registry per
`Gateway`; they reach a scrape from this process's `/metrics` and, summed over every process on
the database, from `qpu-gateway metrics serve` (server/telemetry/snapshots.py). Gauges of the
state every process shares (jobs by state, queue depth and age, pending approvals, budgets used)
are read from the database at each scrape (`read_state`), so any process reports them whole.

Labels are bounded on purpose: a tool, resource or backend name a caller makes up is `other`, a
provider code is a short token (adapters/base.py), agents and projects are those keys exist for.
The README's "Metrics" section lists every series with its labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, Metric, disable_created_metrics, generate_latest
from prometheus_client.registry import Collector

from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.policy.file import Policy, Quota
from qpu_gateway.policy.pricing import MICRO_USD_PER_USD
from qpu_gateway.policy.quotas import DIMENSIONS, PERIODS, cap_units, caps_of
from qpu_gateway.store import ERRORS as STORE_ERRORS
from qpu_gateway.store import Store
from qpu_gateway.store.records import JobRecord

PREFIX = "qpu_gateway_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The explicit bucket boundaries the OpenTelemetry MCP semantic conventions give the operation
# duration histogram (mcp.server.operation.duration, seconds).
CALL_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# A job waits and runs from milliseconds (Aer) to hours (a cloud device's queue): up to a day.
JOB_BUCKETS = (0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
OTHER = "other"
LIVE_STATES = (JobState.PENDING_APPROVAL, JobState.QUEUED, JobState.SUBMITTING, JobState.RUNNING)
BREAKER_STATES = ("closed", "open", "half_open")
STORE_ERROR_KINDS = ("busy", "read_only", "full", "unavailable", "aborted", "refused", "error")
ProviderCall = Literal["submit", "status", "result", "cancel", "usage"]
# No `_created` series: each would double the exposition, and rate() does not need them.
cast(Callable[[], None], disable_created_metrics)()  # the library leaves it unannotated


class GatewayMetrics:
    """This process's counters and histograms, and the events that move them (one per Gateway)."""

    def __init__(
        self,
        *,
        backend_known: Callable[[str], bool] = lambda _backend: False,
        breakers: Callable[[], Mapping[str, str]] = dict,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._backend_known = backend_known
        self.names: frozenset[str] = frozenset()  # the server's tools, resources and prompts: the rest are `other`
        r = self.registry
        self.calls = Counter(
            PREFIX + "calls",
            "MCP calls by method, tool (or resource, prompt) and outcome code ('ok' when it succeeded).",
            ["method", "name", "code"],
            registry=r,
        )
        self.call_seconds = Histogram(
            PREFIX + "call_duration_seconds",
            "Time to answer an MCP call, by method and tool (OpenTelemetry MCP buckets).",
            ["method", "name"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.admitted = Counter(
            PREFIX + "jobs_admitted",
            "Jobs admitted, by agent, project, backend, and the state they entered (queued or pending_approval).",
            ["agent", "project", "backend", "state"],
            registry=r,
        )
        self.refused = Counter(
            PREFIX + "jobs_refused",
            "submit_job calls refused, by code, agent, project and backend.",
            ["code", "agent", "project", "backend"],
            registry=r,
        )
        self.finished = Counter(
            PREFIX + "jobs_finished",
            "Jobs ended by this process, by backend, final state and error code ('' when none).",
            ["backend", "state", "code"],
            registry=r,
        )
        self.queue_wait = Histogram(
            PREFIX + "queue_wait_seconds",
            "From a job's entry into the queue (admission or approval) to its first claim by a worker.",
            ["backend"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.run_seconds = Histogram(
            PREFIX + "job_run_seconds",
            "From a job's first claim to its end, for jobs a worker ran.",
            ["backend"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.provider_calls = Counter(
            PREFIX + "provider_calls",
            "Calls to providers by backend and kind of call (submit, status, result, cancel, usage).",
            ["provider", "backend", "call"],
            registry=r,
        )
        self.provider_errors = Counter(
            PREFIX + "provider_errors",
            "Failed provider calls by provider, backend, class (transient, quota, permanent) and provider code.",
            ["provider", "backend", "class", "code"],
            registry=r,
        )
        self.retries = Counter(
            PREFIX + "provider_retries",
            "Provider calls retried after a transient failure, by backend and kind of call.",
            ["backend", "call"],
            registry=r,
        )
        self.spend = Counter(
            PREFIX + "spend_usd",
            "Cost committed as jobs ended (USD: the provider's figure, else the estimate) by agent, project, backend.",
            ["agent", "project", "backend"],
            registry=r,
        )
        self.rate_limited = Counter(
            PREFIX + "rate_limit_refusals",
            "Calls refused by a rate-limit rule, by the rule's id in the policy.",
            ["rule"],
            registry=r,
        )
        self.storms = Counter(
            PREFIX + "storm_alerts",
            "Storm alerts raised (an agent refused in bulk, probably looping), by agent.",
            ["agent"],
            registry=r,
        )
        r.register(_Breakers(breakers))
        r.register(_StoreErrors())

    # -- labels -----------------------------------------------------------------------------

    def backend_label(self, backend: str | None) -> str:
        return backend if backend is not None and self._backend_known(backend) else OTHER

    def name_label(self, name: str) -> str:
        return name if name in self.names else OTHER

    # -- events -----------------------------------------------------------------------------

    def call(self, method: str, name: str, code: str | None, seconds: float) -> None:
        label = self.name_label(name)
        self.calls.labels(method, label, code or "ok").inc()
        self.call_seconds.labels(method, label).observe(seconds)

    def submit_refused(self, code: str, agent: str | None, project: str | None, backend: str | None) -> None:
        self.refused.labels(code, agent or "", project or "", self.backend_label(backend)).inc()

    def provider_call(self, backend: str, call: ProviderCall) -> None:
        self.provider_calls.labels(backend.partition("/")[0], backend, call).inc()

    def provider_error(self, backend: str, kind: str, code: str | None) -> None:
        self.provider_errors.labels(backend.partition("/")[0], backend, kind, code or "").inc()

    def retry(self, backend: str, call: ProviderCall) -> None:
        self.retries.labels(backend, call).inc()

    def rate_limit(self, rule: str) -> None:
        self.rate_limited.labels(rule).inc()

    def storm(self, agent: str) -> None:
        self.storms.labels(agent).inc()

    async def job_changed(self, job_id: str, state: JobState, job: JobRecord | None) -> None:
        """A JobListener: count the changes this process made (`job` is None for another process's)."""
        if job is None:
            return
        if job.version == 1 and state in (JobState.QUEUED, JobState.PENDING_APPROVAL):
            self.admitted.labels(job.agent, job.project, job.backend, state.value).inc()
        elif state is JobState.SUBMITTING and job.runs == 1 and job.started_at is not None:
            entered = job.queued_at if job.queued_at is not None else job.created_at
            self.queue_wait.labels(job.backend).observe(max(0.0, job.started_at - entered))
        if state not in TERMINAL:
            return
        self.finished.labels(job.backend, state.value, job.error_code or "").inc()
        if job.started_at is not None and job.finished_at is not None and job.runs > 0:
            self.run_seconds.labels(job.backend).observe(max(0.0, job.finished_at - job.started_at))
        if job.ledger_status == "committed" and job.ledger_micro_usd:
            self.spend.labels(job.agent, job.project, job.backend).inc(job.ledger_micro_usd / MICRO_USD_PER_USD)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Breakers(Collector):
    """Each backend's breaker in this process, one series per state (1 for the state it is in)."""

    def __init__(self, states: Callable[[], Mapping[str, str]]) -> None:
        self._states = states

    def describe(self) -> Iterator[Metric]:
        # What registering asks for: without it the registry collects, before the workers exist.
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for backend, now in sorted(self._states().items()):
            for state in BREAKER_STATES:
                family.add_sample(family.name, {"backend": backend, "state": state}, 1.0 if state == now else 0.0)
        yield family

    @staticmethod
    def _family() -> Metric:
        return Metric(
            PREFIX + "breaker_state", "Circuit breaker per backend in this process (1: the state it is in).", "gauge"
        )


class _StoreErrors(Collector):
    """Database errors this process met, by kind (store.ERRORS counts every StoreError raised)."""

    def collect(self) -> Iterator[Metric]:
        family = Metric(PREFIX + "store_errors", "Database errors met by this process, by kind.", "counter")
        for kind in sorted(set(STORE_ERROR_KINDS) | set(STORE_ERRORS)):
            family.add_sample(family.name + "_total", {"kind": kind}, float(STORE_ERRORS.get(kind, 0)))
        yield family


# -- the shared state, read at a scrape ----------------------------------------------------


@dataclass(frozen=True, eq=False)  # a registry keys its collectors by identity
class Families(Collector):
    """Metric families already built (from the database, or summed snapshots), as a collector."""

    metrics: tuple[Metric, ...]

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics


def exposition_of(metrics: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(tuple(metrics)))
    return generate_latest(registry)


async def read_state(store: Store, policy: Policy, now: float | None = None) -> list[Metric]:
    """The gateway-wide gauges, from the database: the same answer from every process on it."""
    now = time.time() if now is None else now
    live = await store.live_jobs()
    jobs = Metric(PREFIX + "jobs", "Jobs not yet ended, by state and backend (all processes).", "gauge")
    depth = Metric(PREFIX + "queue_depth", "Jobs queued for a worker, by backend.", "gauge")
    oldest = Metric(PREFIX + "queue_oldest_age_seconds", "Age of the oldest queued job, by backend.", "gauge")
    pending = Metric(PREFIX + "approvals_pending", "Jobs waiting for a person's approval.", "gauge")
    pending_age = Metric(
        PREFIX + "approvals_oldest_age_seconds", "Age of the oldest job waiting for approval.", "gauge"
    )
    held, held_since = 0, now
    for row in sorted(live, key=lambda r: (r.state.value, r.backend)):
        jobs.add_sample(jobs.name, {"state": row.state.value, "backend": row.backend}, float(row.jobs))
        if row.state is JobState.QUEUED:
            depth.add_sample(depth.name, {"backend": row.backend}, float(row.jobs))
            oldest.add_sample(oldest.name, {"backend": row.backend}, max(0.0, now - row.oldest_at))
        elif row.state is JobState.PENDING_APPROVAL:
            held += row.jobs
            held_since = min(held_since, row.oldest_at)
    pending.add_sample(pending.name, {}, float(held))
    pending_age.add_sample(pending_age.name, {}, max(0.0, now - held_since) if held else 0.0)
    return [jobs, depth, oldest, pending, pending_age, await _budgets(store, policy, now)]


async def _budgets(store: Store, policy: Policy, now: float) -> Metric:
    """Committed plus reserved over each cap the policy sets, per agent and project with a live key."""
    family = Metric(
        PREFIX + "budget_used_ratio",
        "Used (committed + reserved) over the cap per agent or project, period and dimension, where a cap is set.",
        "gauge",
    )
    pairs = sorted(
        {
            (k.agent, k.project)
            for k in await store.list_keys()
            if k.revoked_at is None and (k.expires_at or now + 1) > now
        }
    )
    seen: set[tuple[str, str]] = set()
    for agent, project in pairs:
        rules = policy.rules_for(agent=agent, project=project)
        scopes: tuple[tuple[Literal["agent", "project"], str, Quota], ...] = (
            ("agent", agent, rules.agent_quota),
            ("project", project, rules.project_quota),
        )
        for scope, name, quota in scopes:
            if (scope, name) in seen:
                continue
            seen.add((scope, name))
            caps = [
                (dimension, period, cap)
                for dimension in DIMENSIONS
                for period in PERIODS
                if (cap := cap_units(caps_of(quota, dimension), period, dimension))
            ]
            if not caps:
                continue
            usage = (await store.ledger_totals(scope, name, now)).usage()
            for dimension, period, cap in caps:
                used = usage.used(period, dimension)
                labels = {"scope": scope, "name": name, "period": period, "dimension": dimension}
                family.add_sample(family.name, labels, used / cap)
    return family
