"""Job change fan-out: wake waiters, and tell subscribed clients of both protocol eras.

A change made in this process is announced at once. A change made by another process on the
same database (a job run by another Claude Code session's server, or another replica) is found by
`watch_foreign_changes`: pushed by the store where the database can push (PostgreSQL's
LISTEN/NOTIFY, with one read of the watched jobs' versions after every (re)connection for what
was missed meanwhile), else by polling the versions of the jobs someone here is waiting on or
subscribed to (SQLite).
"""

from __future__ import annotations

import logging
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

import anyio
from mcp.server.subscriptions import ResourceUpdated, SubscriptionBus

from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import JobChange, JobRecord

log = logging.getLogger(__name__)

JOB_URI_PREFIX = "qpu://jobs/"
RECENT_KEPT = 1024  # jobs this process changed, remembered: an agent reads or awaits them soon after


def job_uri(job_id: str) -> str:
    return f"{JOB_URI_PREFIX}{job_id}"


def job_id_of(uri: str) -> str | None:
    return uri[len(JOB_URI_PREFIX) :] if uri.startswith(JOB_URI_PREFIX) else None


class LegacySession(Protocol):
    """The part of a 2025-era session we use: the `notifications/resources/updated` sender."""

    async def send_resource_updated(self, uri: str) -> None: ...


class JobListener(Protocol):
    """Told of every job change announced here (the job as stored, when this process made the change)."""

    async def job_changed(self, job_id: str, state: JobState, job: JobRecord | None) -> None: ...


class JobEvents:
    def __init__(self, bus: SubscriptionBus) -> None:
        self._listeners: weakref.WeakSet[JobListener] = weakref.WeakSet()  # held by whoever listens
        self._bus = bus
        self._changed: dict[str, anyio.Event] = {}
        self._watchers: Counter[str] = Counter()  # job id -> waiters and subscribers in this process
        self._legacy: dict[str, list[LegacySession]] = {}  # uri -> 2025-era subscribed sessions
        self._versions: dict[str, int] = {}  # last version announced, per watched job
        self._latest: dict[str, JobRecord] = {}  # the job as this process last changed it, per watched job
        # The last jobs this process changed, as it stored them (the newest RECENT_KEPT). An ended
        # one never changes again (no transition leaves a terminal state), so a read of it is served
        # from here; one still under way may have been moved by another process since, so only a
        # wait starts from it (it reads the job again within the poll interval).
        self._recent: OrderedDict[str, JobRecord] = OrderedDict()

    # -- who is interested ------------------------------------------------------------------

    def watch(self, job_id: str, version: int) -> None:
        """Count one more interested party; `version` is the job as they last saw it."""
        self._watchers[job_id] += 1
        self._versions[job_id] = max(self._versions.get(job_id, 0), version)

    def unwatch(self, job_id: str) -> None:
        self._watchers[job_id] -= 1
        if self._watchers[job_id] <= 0:
            del self._watchers[job_id]
            self._versions.pop(job_id, None)
            self._latest.pop(job_id, None)

    def listen(self, listener: JobListener) -> None:
        """Tell `listener` of every change announced from now on, for as long as its owner keeps it."""
        self._listeners.add(listener)

    def subscribe_legacy(self, uri: str, session: LegacySession, version: int) -> None:
        sessions = self._legacy.setdefault(uri, [])
        if session not in sessions:
            sessions.append(session)
            job_id = job_id_of(uri)
            if job_id:
                self.watch(job_id, version)

    def unsubscribe_legacy(self, uri: str, session: LegacySession) -> None:
        sessions = self._legacy.get(uri, [])
        if session in sessions:
            sessions.remove(session)
            job_id = job_id_of(uri)
            if job_id:
                self.unwatch(job_id)
        if not sessions:
            self._legacy.pop(uri, None)

    def latest(self, job_id: str, *, newer_than: int) -> JobRecord | None:
        """The watched job as announced by this process, if that is newer than `newer_than`; None
        when the newest change is another process's (then read the job from the store)."""
        job = self._latest.get(job_id)
        return job if job is not None and job.version > newer_than else None

    def settled(self, job_id: str) -> JobRecord | None:
        """The job as this process ended it, if it did so lately (it cannot have changed since)."""
        job = self._recent.get(job_id)
        return job if job is not None and job.state in TERMINAL else None

    def recent(self, job_id: str) -> JobRecord | None:
        """The job as this process last changed it, if it did so lately and no other process's later
        change has been heard of; it may be out of date unless it has ended."""
        return self._recent.get(job_id)

    def changed_event(self, job_id: str) -> anyio.Event:
        """An event set at the job's next change; take it before re-reading the job."""
        event = self._changed.get(job_id)
        if event is None:
            event = self._changed[job_id] = anyio.Event()
        return event

    # -- announcing -------------------------------------------------------------------------

    async def announce(self, job: JobRecord) -> None:
        """Announce the job as it now is (waiters here take this record instead of reading it again)."""
        if job.id in self._watchers and self._versions.get(job.id, 0) < job.version:
            self._latest[job.id] = job
        known = self._recent.get(job.id)
        if known is None or known.version <= job.version:
            self._recent[job.id] = job
            self._recent.move_to_end(job.id)
            if len(self._recent) > RECENT_KEPT:
                self._recent.popitem(last=False)
        await self.job_changed(job.id, job.version, job.state, job=job)

    async def job_changed(self, job_id: str, version: int, state: JobState, *, job: JobRecord | None = None) -> None:
        """Announce one change (once per version, whichever path found it first).

        After a terminal change nothing more will happen to the job, so its 2025-era
        subscribers are forgotten (their sessions would otherwise be held for ever).
        """
        if self._versions.get(job_id, 0) >= version:
            return
        terminal = state in TERMINAL
        if job_id in self._watchers:
            self._versions[job_id] = version
            latest = self._latest.get(job_id)
            if latest is not None and latest.version < version:  # another process's change
                del self._latest[job_id]
        self._forget_older(job_id, version)
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()
        uri = job_uri(job_id)
        # The subscribers of this change are those subscribed now: a later (terminal) change
        # announced while this one awaits the bus forgets them, and they must still hear this one.
        sessions = list(self._legacy.get(uri, ()))
        await self._bus.publish(ResourceUpdated(uri=uri))
        for session in sessions:
            try:
                await session.send_resource_updated(uri)
            except Exception:  # a closed session: forget it rather than fail the worker
                log.info("dropping a closed subscriber", extra={"uri": uri})
                self.unsubscribe_legacy(uri, session)
        if terminal:
            for session in list(self._legacy.get(uri, ())):
                self.unsubscribe_legacy(uri, session)
        for listener in list(self._listeners):
            try:
                await listener.job_changed(job_id, state, job)
            except Exception:  # a listener's trouble must not fail the worker that announced
                log.exception("a job listener failed")

    def _forget_older(self, job_id: str, version: int) -> None:
        """A change of the job newer than this process's record of it: that record is out of date."""
        known = self._recent.get(job_id)
        if known is not None and known.version < version:
            del self._recent[job_id]

    async def watch_foreign_changes(
        self, store: Store, interval_s: float, wake_workers: Callable[[], None] | None = None
    ) -> None:
        """Announce changes other processes made to watched jobs, as the store pushes them or by
        polling every `interval_s`; a job another process queued wakes this process's workers."""

        async def pushed(change: JobChange) -> None:
            if change.state is JobState.QUEUED and wake_workers is not None:
                wake_workers()
            self._forget_older(change.job_id, change.version)
            if change.job_id in self._watchers and change.version > self._versions.get(change.job_id, 0):
                await self.job_changed(change.job_id, change.version, change.state)

        if await store.watch_changes(pushed, lambda: self._poll_once(store)):
            return
        while True:
            await anyio.sleep(interval_s)
            await self._poll_once(store)

    async def _poll_once(self, store: Store) -> None:
        """Read the watched jobs' versions once, announcing those another process changed."""
        ids = list(self._watchers)
        if not ids:
            return
        try:
            versions = await store.job_versions(ids)
        except StoreError as exc:
            log.warning("cannot poll job versions: %s", exc)
            return
        for job_id, (version, state) in versions.items():
            if version > self._versions.get(job_id, 0):
                await self.job_changed(job_id, version, state)
