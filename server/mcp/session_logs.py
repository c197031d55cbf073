"""MCP log messages (`notifications/message`) for a client that asked for them: only its own.

How a client asks depends on the era. 2025-11-25 has `logging/setLevel`: the connection's level
then holds for every later call on it, and the connection also hears of the state changes of the
jobs it submitted, between calls (on its standalone stream). 2026-07-28 retired `logging/setLevel`
(SEP-2577); a request asks for messages about itself with the `io.modelcontextprotocol/logLevel`
key of its `_meta`, and gets them on its own response stream (the SDK's `allowed_log_levels`).

What is sent: a call's outcome (a refusal at `warning`, or `error` for the gateway's own failures;
a success at `debug`), each wait for a rate limit (`info`), and job state changes (`info`; a job that
failed or was rejected at `error`, one that expired or was cancelled at `warning`). Every message is
about the caller's own call or job, built from what the caller is shown anyway, and redacted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_args

from mcp.server.connection import Connection, allowed_log_levels
from mcp.server.context import ServerRequestContext
from mcp_types import LoggingLevel, LoggingMessageNotification, LoggingMessageNotificationParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from qpu_gateway.jobs.events import JobEvents
from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.store.records import JobRecord
from qpu_gateway.telemetry.logs import redact

log = logging.getLogger(__name__)

LOGGER = "qpu-gateway"
LEVELS: tuple[LoggingLevel, ...] = get_args(LoggingLevel)  # RFC 5424 order, least severe first
STATE_LEVEL: dict[JobState, LoggingLevel] = {
    JobState.FAILED: "error",
    JobState.REJECTED: "error",
    JobState.EXPIRED: "warning",
    JobState.CANCELLED: "warning",
}
Send = Callable[[LoggingLevel, dict[str, Any]], Awaitable[None]]


def at_or_above(level: LoggingLevel) -> frozenset[LoggingLevel]:
    return frozenset(LEVELS[LEVELS.index(level) :])


def job_message(job_id: str, state: JobState, job: JobRecord | None) -> tuple[LoggingLevel, dict[str, Any]]:
    data: dict[str, Any] = {"event": "job_state", "job_id": job_id, "state": state.value}
    if job is not None and job.error_code:
        data["error"] = {"code": job.error_code, "message": redact(job.error_message or "")}
    return STATE_LEVEL.get(state, "info"), data


def connection_of(ctx: ServerRequestContext[Any, Any]) -> Connection:
    # The request's session is built per request around its connection; the SDK has no public
    # accessor for the connection, which is what a logging/setLevel level belongs to.
    return ctx.session._connection


@dataclass
class _Listener:
    """A 2025-era connection that set a level, and the jobs it submitted since."""

    connection: Connection
    levels: frozenset[LoggingLevel]
    jobs: set[str] = field(default_factory=set)


class SessionLogs:
    """Who asked for log messages at which level, and the job changes they follow."""

    def __init__(self, events: JobEvents) -> None:
        self._events = events
        self._listeners: dict[int, _Listener] = {}  # by id(connection)
        events.listen(self)

    def set_level(self, ctx: ServerRequestContext[Any, Any], level: LoggingLevel) -> None:
        """`logging/setLevel` on a 2025-era connection: from now on, messages at `level` and above."""
        connection = connection_of(ctx)
        listener = self._listeners.get(id(connection))
        if listener is None:
            listener = self._listeners[id(connection)] = _Listener(connection, at_or_above(level))
            connection.exit_stack.callback(self._forget, id(connection))
        listener.levels = at_or_above(level)

    def levels_for(self, ctx: ServerRequestContext[Any, Any]) -> frozenset[LoggingLevel]:
        """The levels this request may be told of: its `_meta` opt-in (2026), or its connection's level."""
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return allowed_log_levels(ctx.protocol_version, ctx.meta)
        listener = self._listeners.get(id(connection_of(ctx)))
        return listener.levels if listener is not None else frozenset()

    def sender(self, ctx: ServerRequestContext[Any, Any]) -> Send:
        """Send a message on this request's own stream (the only one a 2026-era request has)."""

        async def send(level: LoggingLevel, data: dict[str, Any]) -> None:
            message = LoggingMessageNotificationParams(level=level, logger=LOGGER, data=data)
            try:
                await ctx.session.send_notification(
                    LoggingMessageNotification(params=message), related_request_id=ctx.request_id
                )
            except Exception:  # a client gone mid-call; the call's own answer decides what it sees
                log.debug("could not send a log message", exc_info=True)

        return send

    def follow(self, ctx: ServerRequestContext[Any, Any], job_id: str, version: int) -> None:
        """The connection submitted `job_id`: tell it of the job's changes, if it asked for messages."""
        listener = self._listeners.get(id(connection_of(ctx)))
        if listener is None or job_id in listener.jobs:
            return
        listener.jobs.add(job_id)
        self._events.watch(job_id, version)  # so changes made by other processes are found too

    def follows(self, ctx: ServerRequestContext[Any, Any], job_id: str) -> bool:
        listener = self._listeners.get(id(connection_of(ctx)))
        return listener is not None and job_id in listener.jobs

    async def job_changed(self, job_id: str, state: JobState, job: JobRecord | None) -> None:
        """A job changed (JobEvents' listener): tell the connections that follow it."""
        level, data = job_message(job_id, state, job)
        for listener in [entry for entry in self._listeners.values() if job_id in entry.jobs]:
            if state in TERMINAL:
                self._unfollow(listener, job_id)
            if level in listener.levels:
                params = {"level": level, "logger": LOGGER, "data": data}
                await listener.connection.notify("notifications/message", params)

    def _unfollow(self, listener: _Listener, job_id: str) -> None:
        listener.jobs.discard(job_id)
        self._events.unwatch(job_id)

    def _forget(self, key: int) -> None:
        """The connection closed: stop following its jobs."""
        listener = self._listeners.pop(key, None)
        for job_id in list(listener.jobs) if listener else []:
            self._events.unwatch(job_id)
