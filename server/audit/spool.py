"""Audit rows that could not be written yet: kept in order and written once the database allows.

Every call leaves an audit row, even one that failed because the database was locked, read-only
or full. Such a row waits here (in memory, in order, with the time of the call) and is written
before the next row this process writes; the gateway also retries every few seconds and once
more on shutdown. A process that dies while rows wait loses them, so each one is also logged in
full, as a warning, when it is set aside.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import asdict

import anyio

from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import AuditEntry

log = logging.getLogger(__name__)

# A database that stays unwritable for long while agents keep calling would otherwise grow this
# without bound; past it the oldest waiting rows are dropped (and were logged when set aside).
MAX_WAITING = 100_000


class AuditSpool:
    def __init__(self) -> None:
        self._waiting: deque[tuple[AuditEntry, float]] = deque()
        self._lock = anyio.Lock()
        self.dropped = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def write(self, store: Store, entry: AuditEntry, at: float) -> None:
        """Write `entry` after any rows still waiting; set it aside if the database refuses."""
        if not self._waiting:
            # The usual case: written at once, side by side with other calls' rows (the store
            # commits rows that arrive together in one transaction).
            try:
                await store.append_audit(entry, at)
            except StoreError as exc:
                self._set_aside(entry, at, str(exc))
            return
        async with self._lock:
            if self._waiting and not await self._flush(store):
                self._set_aside(entry, at, "earlier audit rows are still waiting")
                return
            try:
                await store.append_audit(entry, at)
            except StoreError as exc:
                self._set_aside(entry, at, str(exc))

    async def flush(self, store: Store) -> bool:
        """Write every waiting row; True when none is left."""
        async with self._lock:
            return await self._flush(store)

    async def _flush(self, store: Store) -> bool:
        while self._waiting:
            entry, at = self._waiting[0]
            try:
                await store.append_audit(entry, at)
            except StoreError:
                return False
            self._waiting.popleft()
            if not self._waiting:
                log.warning("audit rows written after the database recovered")
        return True

    def _set_aside(self, entry: AuditEntry, at: float, reason: str) -> None:
        if len(self._waiting) >= MAX_WAITING:
            self._waiting.popleft()
            self.dropped += 1
        self._waiting.append((entry, at))
        log.warning(
            "audit row set aside until the database takes writes: %s",
            reason,
            extra={"audit": {"at": at, **asdict(entry)}},
        )
