"""The one place MCP calls meet the gateway: authenticate, audit, and map errors.

A middleware wraps every tool call, resource read and subscription: it resolves the caller's
key to a `Principal` (checked against the store on every call, so a revoked key stops at
once), and writes exactly one audit row when the call ends, admitted or refused. Handlers run
their service function through `tool()` or `resource()`, which turn a `GatewayError` into
the agent-facing result: `isError` with the body `{code, message, retry_after_s?, job_id?}` as
its JSON text.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver.exceptions import ResourceNotFoundError
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, INVALID_REQUEST, CallToolResult, LoggingLevel, TextContent
from pydantic import BaseModel, ValidationError

from qpu_gateway.adapters.aer import BACKEND_ID as DEFAULT_BACKEND
from qpu_gateway.audit.chain import args_hash
from qpu_gateway.errors import (
    Forbidden,
    GatewayError,
    InternalError,
    InvalidArguments,
    NotFound,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from qpu_gateway.jobs.events import JOB_URI_PREFIX, job_id_of
from qpu_gateway.jobs.pauses import agent_paused
from qpu_gateway.jobs.ratelimit import applicable
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.keys import Principal, authenticate
from qpu_gateway.mcp.session_logs import Send, SessionLogs
from qpu_gateway.store import StoreError
from qpu_gateway.store.records import AuditEntry
from qpu_gateway.telemetry import notifications
from qpu_gateway.telemetry.logs import redact

log = logging.getLogger(__name__)

T = TypeVar("T")
# The caller's key for this call; or, where the transport already checked the key for this very
# request (HTTP's token verifier), the principal it found, so the store is not asked twice.
KeySource = Callable[[], str | Principal | None]
Progress = Callable[[float, str], Awaitable[None]]
# Every method that acts for the caller or reads its data. completion/complete is one: it answers
# with the caller's own job ids and the backends its policy allows.
AUDITED_METHODS = frozenset(
    {
        "tools/call",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "subscriptions/listen",
        "prompts/get",
        "completion/complete",
    }
)
BACKEND_TOOLS = frozenset({"submit_job", "estimate_job"})
STATIC_RESOURCES = frozenset({"qpu://backends", "qpu://usage", "qpu://policy"})
JOB_TEMPLATE_URI = JOB_URI_PREFIX + "{job_id}"
_UNEXPECTED = "The gateway failed unexpectedly; the operator's log has the details. Try again later."


@dataclass
class CallState:
    """One call as the middleware and the handler share it."""

    method: str
    name: str
    args_hash: str | None
    arguments: dict[str, Any] = field(default_factory=dict)
    principal: Principal | None = None
    auth_error: GatewayError | None = None
    ran: bool = False
    decision: str = "ok"
    error_code: str | None = None
    job_id: str | None = None
    audited: bool = False  # the service wrote the row inside its own transaction
    memo: dict[tuple[object, ...], Any] = field(default_factory=dict)  # work shared by resolvers and the handler
    refusal: dict[str, Any] | None = None  # the coded body the caller was given
    log_levels: frozenset[str] = frozenset()  # what the caller asked to be told (server/mcp/session_logs.py)
    send_log: Send | None = None
    follows: Callable[[str], bool] = lambda _job_id: False  # jobs whose changes reach the caller anyway
    started: float = field(default_factory=time.perf_counter)
    rate_rule: str | None = None  # the rate-limit rule that refused the call

    def require(self, scope: str) -> Principal:
        if self.principal is None:
            raise self.auth_error or Unauthorized("No gateway key was given.")
        if self.principal.paused is not None:  # read with the key, so it costs the call nothing more
            raise agent_paused(self.principal.paused)
        if scope not in self.principal.scopes:
            raise Forbidden(
                f"Your key lacks the '{scope}' scope this call needs. Ask the operator for a key with it "
                f"(`qpu-gateway keys create --scopes ...`)."
            )
        return self.principal

    def refuse(self, error: GatewayError) -> None:
        if isinstance(error, RateLimited):
            self.rate_rule = error.rule
        self.decision = "error" if isinstance(error, InternalError | Unavailable) else "refused"
        self.error_code = error.code
        self.job_id = self.job_id or error.job_id
        self.refusal = error.body()

    async def log(self, level: LoggingLevel, data: dict[str, Any]) -> None:
        """A log message about this call, if the caller asked for messages at `level`."""
        if self.send_log is not None and level in self.log_levels:
            await self.send_log(level, data)

    def entry(self) -> AuditEntry:
        who = self.principal
        return AuditEntry(
            tool=self.name,
            decision=self.decision,
            agent=who.agent if who else None,
            project=who.project if who else None,
            key_id=who.key_id if who else None,
            error_code=self.error_code,
            args_hash=self.args_hash,
            job_id=self.job_id,
        )


_CURRENT: ContextVar[CallState | None] = ContextVar("qpu_gateway_call", default=None)


def current_call() -> CallState:
    state = _CURRENT.get()
    if state is None:  # only reachable if a handler runs without the middleware installed
        raise RuntimeError("gateway call state missing: the gateway middleware is not installed")
    return state


def error_result(error: GatewayError) -> CallToolResult:
    """A refusal as a tool result: `isError`, the coded body as JSON text, and no structured content.

    A tool's `structuredContent` must match its output schema, which describes the success; clients
    check it (the TypeScript SDK v1 rejects the whole call when it does not match), so an error
    carries its body in the text only. docs/architecture.md says why not a schema for both shapes.
    """
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(error.body(), ensure_ascii=False))],
        is_error=True,
    )


def ok_result(model: BaseModel) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=model.model_dump_json())],
        structured_content=model.model_dump(mode="json"),
    )


class Calls:
    """Authentication, audit and error mapping for one gateway's MCP server."""

    def __init__(self, gateway: Gateway, key_source: KeySource, *, key_hint: str | None = None) -> None:
        self.gateway = gateway
        self.key_source = key_source
        # Where this server takes keys from and checks them, added to every `unauthorized` message
        # (stdio: the caller started this process, so naming its database tells them nothing new).
        self.key_hint = key_hint
        self.logs = SessionLogs(gateway.events)

    # -- middleware -------------------------------------------------------------------------

    async def middleware(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method not in AUDITED_METHODS or ctx.request_id is None:
            return await call_next(ctx)
        params = dict(ctx.params or {})
        name, hashed = _name_and_hash(ctx.method, params)
        arguments = params.get("arguments") if ctx.method == "tools/call" else None
        state = CallState(
            method=ctx.method, name=name, args_hash=hashed, arguments=arguments if isinstance(arguments, dict) else {}
        )
        state.log_levels = self.logs.levels_for(ctx)
        if state.log_levels:
            state.send_log = self.logs.sender(ctx)
            state.follows = lambda job_id: self.logs.follows(ctx, job_id)
        try:
            source = self.key_source()
            state.principal = (
                source if isinstance(source, Principal) else await authenticate(self.gateway.store, source)
            )
        except Unauthorized as exc:
            state.auth_error = Unauthorized(f"{exc.message} {self.key_hint}") if self.key_hint else exc
        except GatewayError as exc:
            state.auth_error = exc
        except StoreError as exc:
            state.auth_error = store_failure(exc)
        token = _CURRENT.set(state)
        watched: list[str] = []
        try:
            if ctx.method == "subscriptions/listen":
                watched = await self._gate_listen(state, params)
            result = await call_next(ctx)
            if ctx.method == "tools/call" and not state.ran and isinstance(result, dict) and result.get("isError"):
                result = self._coded_sdk_refusal(state, result)
            if isinstance(result, dict) and result.get("resultType") == "input_required":
                state.decision = "asked"  # a 2026-era round that returned a question to the person
            if state.name == "submit_job" and state.job_id and state.log_levels and state.decision == "ok":
                await self._follow(ctx, state.job_id)
            await self._log_outcome(state)
            return result
        except MCPError as exc:
            state.decision = "refused" if state.decision == "ok" else state.decision
            state.error_code = state.error_code or _code_of(exc)
            await self._log_outcome(state)
            raise
        except ValueError as exc:
            refusal = self._prompt_refusal(state, exc) if ctx.method == "prompts/get" else None
            if refusal is None:
                state.decision, state.error_code = "error", state.error_code or "internal_error"
                raise
            await self._log_outcome(state)
            raise refusal from None
        except Exception:
            state.decision, state.error_code = "error", state.error_code or "internal_error"
            raise
        finally:
            _CURRENT.reset(token)
            for job_id in watched:
                self.gateway.events.unwatch(job_id)
            self._count(state)
            if not state.audited:
                with anyio.CancelScope(shield=True):
                    await self._audit(state)

    async def _gate_listen(self, state: CallState, params: dict[str, Any]) -> list[str]:
        """Let a 2026-era client watch only its own jobs; returns the job ids it now watches.

        The refusal names no URI, so it never confirms which job ids exist.
        """
        state.ran = True
        try:
            who = state.require("read")
        except GatewayError as exc:
            state.refuse(exc)
            raise MCPError(INVALID_REQUEST, f"{exc.code}: {exc.message}", data=exc.body()) from None
        notifications = params.get("notifications") or {}
        uris = notifications.get("resourceSubscriptions") or [] if isinstance(notifications, dict) else []
        jobs = []
        for uri in uris if isinstance(uris, list) else []:
            job_id = job_id_of(str(uri))
            job = await self.gateway.store.get_job(job_id) if job_id else None
            if job_id is None and uri in STATIC_RESOURCES:
                continue
            if job is None or job.agent != who.agent:
                error = NotFound("Not permitted to watch the requested resources; watch only your own jobs.")
                state.refuse(error)
                raise MCPError(INVALID_REQUEST, f"{error.code}: {error.message}", data=error.body())
            jobs.append(job)
        for job in jobs:
            self.gateway.events.watch(job.id, job.version)
        return [job.id for job in jobs]

    def _prompt_refusal(self, state: CallState, exc: ValueError) -> MCPError | None:
        """The SDK's own prompts/get refusals as invalid-params errors with our coded body.

        The SDK raises an unknown prompt, missing arguments or arguments the prompt does not take as
        a ValueError, which would answer JSON-RPC code 0 (-32603 in 2026) and log a traceback; they
        are the caller's mistake. Anything else stays an internal error.
        """
        text = redact(str(exc))[:300]
        error: GatewayError
        if text.startswith("Unknown prompt"):
            error = NotFound(f"{text}. Call prompts/list for the gateway's prompts.")
        elif text.startswith("Missing required arguments") or _called_with_bad_arguments(exc):
            error = InvalidArguments(f"{text}: prompts/list shows the prompt's arguments.")
        else:
            return None
        state.refuse(error)
        return MCPError(INVALID_PARAMS, f"{error.code}: {error.message}", data=error.body())

    async def _follow(self, ctx: ServerRequestContext[Any, Any], job_id: str) -> None:
        job = await self.gateway.store.get_job(job_id)
        if job is not None:
            self.logs.follow(ctx, job.id, job.version)

    async def _log_outcome(self, state: CallState) -> None:
        if state.send_log is None:
            return
        data: dict[str, Any] = {"event": "call", "call": state.name, "decision": state.decision}
        if state.job_id:
            data["job_id"] = state.job_id
        if state.decision in ("refused", "error"):
            data.update(state.refusal or {"code": state.error_code})
            await state.log("error" if state.decision == "error" else "warning", data)
        else:
            await state.log("debug", data)

    def _coded_sdk_refusal(self, state: CallState, result: dict[str, Any]) -> dict[str, Any]:
        """Give the SDK's own refusals (bad arguments, unknown tool) our coded body."""
        texts = [c.get("text", "") for c in result.get("content") or [] if isinstance(c, dict)]
        text = redact(" ".join(texts))[:600]
        error: GatewayError
        if text.startswith("Unknown tool"):
            error = NotFound(f"{text}. Call tools/list for the gateway's tools.")
        else:
            error = InvalidArguments(f"{text.removeprefix('Error executing tool ')} Check the tool's input schema.")
        state.refuse(error)
        wire = error_result(error).model_dump(mode="json", by_alias=True, exclude_none=True)
        kept = {key: value for key, value in result.items() if key != "structuredContent"}
        return {**kept, "content": wire["content"]}

    def _count(self, state: CallState) -> None:
        """The call in this process's metrics: by method, target and code; a refused submit_job by
        who and where; a rate-limit refusal by its rule."""
        metrics = self.gateway.metrics
        metrics.call(
            state.method, call_target(state.method, state.name), state.error_code, time.perf_counter() - state.started
        )
        if state.rate_rule is not None:
            metrics.rate_limit(state.rate_rule)
        held = state.error_code == "approval_required" and state.job_id is not None  # admitted, waiting for a yes
        if state.name == "submit_job" and state.decision in ("refused", "error") and state.error_code and not held:
            who = state.principal
            backend = state.arguments.get("backend", DEFAULT_BACKEND)
            metrics.submit_refused(
                state.error_code, who.agent if who else None, who.project if who else None, str(backend)[:100]
            )

    async def _audit(self, state: CallState) -> None:
        now = time.time()
        await self.gateway.audit_spool.write(self.gateway.store, state.entry(), now)
        if state.decision == "refused" and state.principal is not None and state.error_code:
            await self._watch_for_storm(state.principal, state.error_code, now)

    async def _watch_for_storm(self, who: Principal, code: str, now: float) -> None:
        """An agent refused in bulk is probably looping: tell the operator, in the log and the audit."""
        rule = self.gateway.policy.rules_for(agent=who.agent, project=who.project).storm_alert
        storm = self.gateway.storms.refused(who.agent, code, now, rule)
        if storm is None:
            return
        self.gateway.metrics.storm(who.agent)
        log.warning(
            "agent storm: %s from agent %s",
            storm.describe(),
            who.agent,
            extra={"agent": who.agent, "project": who.project, "refused": storm.refused, "codes": storm.codes},
        )
        entry = AuditEntry(
            tool="agent.storm",
            decision="alert",
            agent=who.agent,
            project=who.project,
            key_id=who.key_id,
            error_code="storm",
            detail=storm.describe(),
        )
        await self.gateway.audit_spool.write(self.gateway.store, entry, now)
        await self.gateway.outbox.emit(self.gateway.store, notifications.storm_alert(storm, project=who.project))

    # -- handler wrappers -------------------------------------------------------------------

    async def tool(
        self,
        scope: str,
        run: Callable[[Principal, CallState], Awaitable[BaseModel]],
        *,
        progress: Progress | None = None,
    ) -> CallToolResult:
        """Check the caller's scope and rate limits, run one tool's service function, map its outcome."""
        state = current_call()
        state.ran = True
        try:
            who = state.require(scope)
            await self._rate_limit(state, who, progress)
            return ok_result(await run(who, state))
        except GatewayError as exc:
            state.refuse(exc)
            return error_result(exc)
        except StoreError as exc:
            error = store_failure(exc)
            state.refuse(error)
            return error_result(error)
        except Exception:
            log.exception("tool %s failed", state.name)
            error = InternalError(_UNEXPECTED)
            state.refuse(error)
            return error_result(error)

    async def _rate_limit(self, state: CallState, who: Principal, progress: Progress | None) -> None:
        rules = self.gateway.policy.rules_for(agent=who.agent, project=who.project)
        counted = applicable(rules, state.name, cost="calls")
        if not counted:
            return
        # Only the tools that name a backend count against per-backend rules.
        backend = state.arguments.get("backend", DEFAULT_BACKEND) if state.name in BACKEND_TOOLS else None
        if backend is None:
            counted = [rule for rule in counted if rule.per != "backend"]

        async def waiting(step: float, message: str) -> None:
            if progress is not None:
                await progress(step, message)
            await state.log("info", {"event": "rate_limit_wait", "call": state.name, "message": message})

        await self.gateway.rate_limiter.enforce(
            counted, who, backend=str(backend) if backend is not None else None, progress=waiting
        )

    async def resource(self, scope: str, uri: str, run: Callable[[Principal], Awaitable[BaseModel]]) -> str:
        """Run one resource read; refusals become protocol errors (resources have no isError)."""
        model = await self.read(scope, run, not_found=ResourceNotFoundError)
        return model.model_dump_json(indent=1)

    async def read(
        self,
        scope: str,
        run: Callable[[Principal], Awaitable[T]],
        *,
        not_found: Callable[[str], Exception] | None = None,
    ) -> T:
        """Run a read that answers outside a tool result (a resource, a completion): its refusals are
        protocol errors carrying the coded body, `not_found` (when given) the SDK's own kind."""
        state = current_call()
        state.ran = True
        try:
            return await run(state.require(scope))
        except NotFound as exc:
            state.refuse(exc)
            if not_found is not None:
                raise not_found(exc.message) from None
            raise MCPError(INVALID_PARAMS, f"{exc.code}: {exc.message}", data=exc.body()) from None
        except GatewayError as exc:
            state.refuse(exc)
            raise MCPError(INVALID_REQUEST, f"{exc.code}: {exc.message}", data=exc.body()) from None
        except StoreError as exc:
            error = store_failure(exc)
            state.refuse(error)
            raise MCPError(INVALID_REQUEST, f"{error.code}: {exc}", data=error.body()) from None


def _called_with_bad_arguments(exc: BaseException) -> bool:
    """Whether the SDK's render failed calling the prompt with arguments it does not take."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, ValidationError) or (isinstance(cause, TypeError) and "argument" in str(cause)):
            return True
        cause = cause.__cause__
    return False


def _name_and_hash(method: str, params: dict[str, Any]) -> tuple[str, str]:
    """What the audit row calls the call, and the sha256 of what it asked."""
    if method in ("tools/call", "prompts/get"):
        return str(params.get("name", ""))[:100], args_hash(params.get("arguments") or {})
    if method == "subscriptions/listen":
        return method, args_hash(params.get("notifications") or {})
    if method == "completion/complete":
        ref = params.get("ref")
        target = (ref.get("uri") or ref.get("name") or "") if isinstance(ref, dict) else ""
        asked = {key: params.get(key) for key in ("ref", "argument", "context")}
        return f"{method}:{str(target)[:200]}", args_hash(asked)
    return f"{method}:{str(params.get('uri', ''))[:200]}", args_hash({"uri": params.get("uri")})


def call_target(method: str, name: str) -> str:
    """What a call acted on, as a metric label: a tool or prompt name, a resource URI (one job's
    as the template), or '' for a method with no target."""
    target = name.removeprefix(f"{method}:")
    if target.startswith(JOB_URI_PREFIX):
        return JOB_TEMPLATE_URI
    return "" if target == method else target


def store_failure(exc: StoreError) -> GatewayError:
    """The agent-facing error for a database that refused: `unavailable` when waiting may help."""
    if exc.retry_after_s is not None:
        return Unavailable(str(exc), retry_after_s=exc.retry_after_s)
    return InternalError(str(exc))


def _code_of(exc: MCPError) -> str:
    data = getattr(exc, "data", None)
    if isinstance(data, dict) and isinstance(data.get("code"), str):
        return str(data["code"])
    if getattr(exc, "code", None) == INVALID_PARAMS:
        return "not_found"
    return "invalid_request"
