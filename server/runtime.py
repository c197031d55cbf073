"""The running gateway: store, policy, providers, job events and workers, started once per process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from mcp.server.subscriptions import InMemorySubscriptionBus

from qpu_gateway.config import Config
from qpu_gateway.events import JobEvents
from qpu_gateway.policy.file import Policy, load_policy
from qpu_gateway.providers import Providers
from qpu_gateway.store import Store, open_store
from qpu_gateway.worker import Workers

log = logging.getLogger(__name__)


class Gateway:
    """Everything a tool call needs. Built unstarted; `running()` opens the store and starts workers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.bus = InMemorySubscriptionBus()
        self.events = JobEvents(self.bus)
        self.providers = Providers(config)
        self.policy: Policy = load_policy(config.policy_path)
        self._store: Store | None = None
        self._workers: Workers | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the gateway is not running")
        return self._store

    @property
    def workers(self) -> Workers:
        if self._workers is None:
            raise RuntimeError("the gateway is not running")
        return self._workers

    @property
    def started(self) -> bool:
        return self._store is not None

    @asynccontextmanager
    async def running(self, *, workers: bool = True) -> AsyncIterator[Gateway]:
        """Open the store, apply migrations, and run workers and the change watcher until exit."""
        store = await open_store(self.config.db_path)
        self._store = store
        self._workers = Workers(self.config, store, self.providers, self.events)
        try:
            async with anyio.create_task_group() as tg:
                if workers:
                    tg.start_soon(self._workers.run)
                tg.start_soon(self.events.watch_foreign_changes, store, self.config.poll_interval_s)
                log.info("gateway running", extra={"db": str(self.config.db_path), "worker": self._workers.owner})
                try:
                    yield self
                finally:
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await store.close()
            self._store = None
            self._workers = None

    @asynccontextmanager
    async def ensure_running(self) -> AsyncIterator[Gateway]:
        """Reuse the gateway if the transport already started it, else run it for this scope."""
        if self.started:
            yield self
        else:
            async with self.running():
                yield self
