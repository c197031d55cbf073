"""The running gateway: store, policy, providers, job events and workers, started once per process."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from mcp.server.subscriptions import InMemorySubscriptionBus

from qpu_gateway.audit.operators import operator_entry, operator_name
from qpu_gateway.audit.spool import AuditSpool
from qpu_gateway.config import Config
from qpu_gateway.jobs.events import JobEvents
from qpu_gateway.jobs.pacing import Pacing
from qpu_gateway.jobs.policy_source import CHECK_INTERVAL_S, PolicySource, Reload
from qpu_gateway.jobs.processes import ProcessReporter
from qpu_gateway.jobs.providers import Providers
from qpu_gateway.jobs.ratelimit import RateLimiter, storage_uri_for
from qpu_gateway.jobs.states import JobState
from qpu_gateway.jobs.worker import Workers
from qpu_gateway.policy.file import Policy
from qpu_gateway.policy.storm import StormWatch
from qpu_gateway.store import Store, StoreError, open_store
from qpu_gateway.store.records import AuditEntry
from qpu_gateway.telemetry.metrics import GatewayMetrics
from qpu_gateway.telemetry.outbox import Outbox
from qpu_gateway.telemetry.snapshots import Publisher

log = logging.getLogger(__name__)


class Gateway:
    """Everything a tool call needs. Built unstarted; `running()` opens the store and starts workers."""

    def __init__(self, config: Config, *, serving: str = "in-process") -> None:
        self.config = config
        self.serving = serving  # how this process serves (its report to the other processes says so)
        self.bus = InMemorySubscriptionBus()
        self.events = JobEvents(self.bus)
        self.providers = Providers(config)
        self.policy_source = PolicySource(config.policy_path)
        self.audit_spool = AuditSpool()
        self.storms = StormWatch()
        self.metrics = GatewayMetrics(backend_known=self.providers.listed, breakers=self._breaker_states)
        self.events.listen(self.metrics)
        self.pacing = Pacing()
        self.outbox = Outbox(config, lambda: self.policy)
        self._store: Store | None = None
        self._workers: Workers | None = None
        self._rate_limiter: RateLimiter | None = None
        self._processes: ProcessReporter | None = None

    def _breaker_states(self) -> dict[str, str]:
        return dict(self._workers.breakers.states()) if self._workers is not None else {}

    @property
    def policy(self) -> Policy:
        """The policy in force now (it reloads when the file changes)."""
        return self.policy_source.current

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the gateway is not running")
        return self._store

    @property
    def rate_limiter(self) -> RateLimiter:
        if self._rate_limiter is None:
            raise RuntimeError("the gateway is not running")
        return self._rate_limiter

    @property
    def workers(self) -> Workers:
        if self._workers is None:
            raise RuntimeError("the gateway is not running")
        return self._workers

    @property
    def processes(self) -> ProcessReporter:
        if self._processes is None:
            raise RuntimeError("the gateway is not running")
        return self._processes

    @property
    def started(self) -> bool:
        return self._store is not None

    @asynccontextmanager
    async def running(self, *, workers: bool = True) -> AsyncIterator[Gateway]:
        """Open the store, apply migrations, and run workers and the change watcher until exit."""
        rate_storage = storage_uri_for(self.config)  # refused before anything opens, if not shared
        store = await open_store(self.config.database)
        await self._say_which_database(store)
        self._store = store
        self._workers = Workers(self.config, store, self.providers, self.events, lambda: self.policy, self.metrics)
        self._rate_limiter = RateLimiter(rate_storage, namespace=store.rate_namespace())
        self._processes = ProcessReporter(store, self.policy_source, self._workers.owner, self.serving)
        self._workers.breakers.on_change = self.outbox.breaker_changed
        self._workers.on_settled = lambda job: self.outbox.after_settle(store, job)
        try:
            async with anyio.create_task_group() as tg:
                if workers:
                    tg.start_soon(self._workers.run)
                    tg.start_soon(self.outbox.run, store, self._workers.owner)
                tg.start_soon(self._processes.run)
                tg.start_soon(self.events.watch_foreign_changes, store, self.config.poll_interval_s, self._workers.wake)
                tg.start_soon(self.policy_source.watch, CHECK_INTERVAL_S, self._audit_reload)
                tg.start_soon(self._expire_approvals)
                tg.start_soon(self._flush_audit_spool)
                tg.start_soon(Publisher(store, self.metrics.registry, self._workers.owner).run)
                log.info("gateway running", extra={"db": str(self.config.database), "worker": self._workers.owner})
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                if not await self.audit_spool.flush(store):
                    log.error("%d audit row(s) could not be written before exit", self.audit_spool.waiting)
                await self._processes.forget()
                await self._rate_limiter.aclose()
                await store.close()
            self._store = None
            self._workers = None
            self._rate_limiter = None
            self._processes = None

    async def _say_which_database(self, store: Store) -> None:
        """Log the database this process opened and its live keys: a server on the wrong file
        (a client that passed no environment lands on the default path) otherwise only shows as
        every key being refused."""
        path, now = self.config.database, time.time()
        try:
            keys = await store.list_keys()
        except StoreError as exc:
            log.warning("opened database %s; cannot count its keys: %s", path, exc, extra={"db": str(path)})
            return
        live = sum(1 for k in keys if k.revoked_at is None and (k.expires_at is None or k.expires_at > now))
        log.info(
            "opened database %s (%d active key(s)); policy %s",
            path,
            live,
            self.config.policy_path,
            extra={"db": str(path), "active_keys": live, "policy": str(self.config.policy_path)},
        )
        if not live:
            log.warning(
                "database %s has no active key: every call will be refused until an operator creates one "
                "(`qpu-gateway keys create --agent NAME --db %s`)",
                path,
                path,
                extra={"db": str(path)},
            )

    async def _audit_reload(self, reload: Reload) -> None:
        """Every reload of the policy in this process, applied or refused, is an audit row naming
        the OS user this process runs as (the operator whose gateway applied the files)."""
        entry = operator_entry(
            "policy.reload",
            operator_name(),
            decision="ok" if reload.applied else "refused",
            error_code=None if reload.applied else "invalid_policy",
            detail=reload.describe(),
        )
        await self.audit_spool.write(self.store, entry, time.time())
        await self.processes.report_now()  # the others see the new hashes now, not at the next report

    async def _flush_audit_spool(self) -> None:
        """Write audit rows set aside while the database refused writes, once it takes them again."""
        while True:
            await anyio.sleep(self.config.approval_sweep_s)
            if self.audit_spool.waiting:
                await self.audit_spool.flush(self.store)

    async def _expire_approvals(self) -> None:
        """Pending approvals past their time become `expired`, releasing their reservation."""
        while True:
            await anyio.sleep(self.config.approval_sweep_s)
            try:
                for job_id in await self.store.expired_approvals(time.time()):
                    expired = await self.store.transition(
                        job_id,
                        JobState.EXPIRED,
                        time.time(),
                        fields={"finished_at": time.time()},
                        audit=AuditEntry(tool="job.expired", decision="event", detail="no approval came in time"),
                        from_state=JobState.PENDING_APPROVAL,
                    )
                    if expired is not None:
                        log.info("approval expired", extra={"job_id": job_id})
                        await self.events.announce(expired)
            except StoreError as exc:
                log.warning("cannot expire approvals: %s", exc)

    @asynccontextmanager
    async def ensure_running(self) -> AsyncIterator[Gateway]:
        """Reuse the gateway if the transport already started it, else run it for this scope."""
        if self.started:
            yield self
        else:
            async with self.running():
                yield self
