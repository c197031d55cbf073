"""The MCP surface: tools, resources and a prompt, each a thin handler over `server.service`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from mcp.server.auth.provider import TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import (
    AcceptedElicitation,
    Context,
    DeclinedElicitation,
    Elicit,
    ElicitationResult,
    MCPServer,
    RequestStateSecurity,
    Resolve,
)
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    CallToolResult,
    CompleteRequestParams,
    CompleteResult,
    Completion,
    EmptyResult,
    PromptReference,
    ResourceTemplateReference,
    SetLevelRequestParams,
    SubscribeRequestParams,
    ToolAnnotations,
    UnsubscribeRequestParams,
)
from pydantic import BaseModel, Field, PrivateAttr

from qpu_gateway import __version__
from qpu_gateway.adapters.aer import BACKEND_ID as DEFAULT_BACKEND
from qpu_gateway.errors import GatewayError
from qpu_gateway.jobs import admission, models, service
from qpu_gateway.jobs.events import job_id_of
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.jobs.states import TERMINAL
from qpu_gateway.mcp.calls import STATIC_RESOURCES, Calls, KeySource, Progress, current_call

INSTRUCTIONS = """\
qpu-gateway runs quantum circuits for you on simulators and quantum hardware, within a policy
set by its operator. Circuits are OpenQASM 2 or 3 text. Typical flow: list_backends, then
estimate_job (free, checks the circuit and the cost), then submit_job, then wait_for_job (or
subscribe to the job's resource) and read the counts. 'aer/simulator' is free and local: use
it first. Refusals are results with isError whose text is a JSON body {code, message,
retry_after_s?, job_id?}; read the message, it says what to do next.
"""

CircuitArg = Annotated[
    str | None,
    Field(
        description="One OpenQASM 2.0 or 3.0 program, starting with its OPENQASM header; it must measure. "
        "Only the standard include (qelib1.inc / stdgates.inc) is allowed."
    ),
]
CircuitsArg = Annotated[
    list[str] | None,
    Field(
        description="Several programs run as one job (a parameter sweep), instead of `circuit`. "
        "Counts come back in the same order."
    ),
]
BackendArg = Annotated[str, Field(description="Backend id from list_backends, 'provider/name'.")]
ShotsArg = Annotated[int, Field(description="Shots per circuit, 1 up to the policy's max_shots.")]
JobIdArg = Annotated[str, Field(description="The job_id submit_job returned.")]
DryRunArg = Annotated[
    bool,
    Field(description="Run on the free local simulator instead, checked against the target backend: costs nothing."),
]
MaxCostArg = Annotated[
    str | float | None,
    Field(description='Refuse the job if its estimated cost is above this many US dollars, e.g. "2.50".'),
]
PriorityArg = Annotated[
    str, Field(description="'low', 'normal' or 'high'; your policy sets the highest you may ask for.")
]


class ApprovalAnswer(BaseModel):
    """The form a person sees when a job needs their yes."""

    approve: bool = Field(description="Run this job and spend its estimated cost?")
    _asked: bool = PrivateAttr(default=True)  # False when the resolver decided without asking


def _answer(result: ElicitationResult[ApprovalAnswer]) -> admission.Answer:
    if isinstance(result, AcceptedElicitation):
        if not result.data._asked:
            return "not_asked"
        return "accepted" if result.data.approve else "declined"
    return "declined" if isinstance(result, DeclinedElicitation) else "cancelled"


def _progress(ctx: Context) -> Progress:
    async def report(step: float, message: str) -> None:
        await ctx.report_progress(step, None, message)

    return report


JOB_TEMPLATE = "qpu://jobs/{job_id}"


READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)


async def ask_approval(
    ctx: Context[Gateway],
    circuit: CircuitArg = None,
    circuits: CircuitsArg = None,
    backend: BackendArg = DEFAULT_BACKEND,
    shots: ShotsArg = 1024,
    dry_run: DryRunArg = False,
    max_cost_usd: MaxCostArg = None,
    priority: PriorityArg = "normal",
) -> ApprovalAnswer | Elicit[ApprovalAnswer]:
    """Ask the person at the client to confirm a job above confirm_above_usd, if the client can ask."""
    not_asked = ApprovalAnswer(approve=False)
    not_asked._asked = False
    caps = ctx.client_capabilities
    who = current_call().principal
    if who is None or who.paused or "submit" not in who.scopes or caps is None or caps.elicitation is None:
        return not_asked  # the tool body refuses, or decides, without asking anyone
    try:
        request = admission.JobRequest.from_args(
            circuit=circuit,
            circuits=circuits,
            backend=backend,
            shots=shots,
            max_cost_usd=max_cost_usd,
            dry_run=dry_run,
            priority=priority,
        )
        question = await admission.approval_question(
            ctx.request_context.lifespan_context, who, request, memo=current_call().memo
        )
    except Exception:  # the tool body reports any problem with its code
        return not_asked
    return not_asked if question is None else Elicit(question, ApprovalAnswer)


async def served_names(server: MCPServer[Gateway]) -> frozenset[str]:
    """The tools, resources, resource templates and prompts `server` serves: the call metrics' labels."""
    names = {tool.name for tool in await server.list_tools()}
    names |= {str(resource.uri) for resource in await server.list_resources()}
    names |= {template.uri_template for template in await server.list_resource_templates()}
    names |= {prompt.name for prompt in await server.list_prompts()}
    return frozenset(names)


def build_server(
    gateway: Gateway,
    key_source: KeySource,
    *,
    token_verifier: TokenVerifier | None = None,
    auth: AuthSettings | None = None,
    key_hint: str | None = None,
    request_state: RequestStateSecurity | None = None,
) -> MCPServer[Gateway]:
    """The gateway's MCP server. `key_source` yields the caller's key for each call; `key_hint`
    says where, for `unauthorized` messages; `request_state` seals 2026-07-28 elicitation rounds
    (the SDK's default is a key of this process only)."""
    calls = Calls(gateway, key_source, key_hint=key_hint)

    @asynccontextmanager
    async def lifespan(server: MCPServer[Gateway]) -> AsyncIterator[Gateway]:
        gateway.metrics.names = await served_names(server)
        async with gateway.ensure_running():
            yield gateway

    mcp: MCPServer[Gateway] = MCPServer(
        "qpu-gateway",
        title="QPU gateway",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        subscriptions=gateway.bus,
        middleware=[calls.middleware],
        token_verifier=token_verifier,
        auth=auth,
        log_level="WARNING",
        request_state_security=request_state,
    )

    # -- tools ------------------------------------------------------------------------------

    @mcp.tool(title="List quantum backends", annotations=READ_ONLY)
    async def list_backends(ctx: Context) -> Annotated[CallToolResult, models.BackendList]:
        """List the simulators and quantum computers this gateway can run circuits on.

        Use it first to pick a `backend` id. Each entry says its qubits, whether it is a simulator,
        its status, its price model, and whether your policy allows it. Costs nothing.
        """
        return await calls.tool("estimate", lambda who, _: service.list_backends(gateway, who), progress=_progress(ctx))

    @mcp.tool(title="Estimate a job", annotations=READ_ONLY)
    async def estimate_job(
        ctx: Context,
        circuit: CircuitArg = None,
        circuits: CircuitsArg = None,
        backend: BackendArg = DEFAULT_BACKEND,
        shots: ShotsArg = 1024,
        dry_run: DryRunArg = False,
        max_cost_usd: MaxCostArg = None,
    ) -> Annotated[CallToolResult, models.Estimate]:
        """Check a circuit and price it without running it: qubits, depth, cost, QPU-seconds, approval.

        Says whether submit_job would admit it now (and if not, the refusal code and the rule), whether
        a person or an operator would have to approve it, and what quota would be left after it.
        Costs nothing and queues nothing; call it before submitting to hardware.
        """

        async def run(who: Any, _: Any) -> models.Estimate:
            request = admission.JobRequest.from_args(
                circuit=circuit,
                circuits=circuits,
                backend=backend,
                shots=shots,
                max_cost_usd=max_cost_usd,
                dry_run=dry_run,
            )
            return await admission.estimate_job(gateway, who, request)

        return await calls.tool("estimate", run, progress=_progress(ctx))

    @mcp.tool(
        title="Submit a job",
        annotations=ToolAnnotations(destructive_hint=False, idempotent_hint=False, open_world_hint=True),
    )
    async def submit_job(
        ctx: Context,
        approval: Annotated[ElicitationResult[ApprovalAnswer], Resolve(ask_approval)],
        circuit: CircuitArg = None,
        circuits: CircuitsArg = None,
        backend: BackendArg = DEFAULT_BACKEND,
        shots: ShotsArg = 1024,
        name: Annotated[str | None, Field(description="A label for you and the operator.")] = None,
        max_cost_usd: MaxCostArg = None,
        idempotency_key: Annotated[
            str | None,
            Field(
                description="Any string of yours: submitting again with the same key and payload returns the "
                "same job instead of a new one (safe retries). Reusing it for another payload is a "
                "conflict."
            ),
        ] = None,
        priority: PriorityArg = "normal",
        dry_run: DryRunArg = False,
    ) -> Annotated[CallToolResult, models.Submitted]:
        """Queue a circuit (or a sweep of circuits) to run on a backend; returns at once with a job_id.

        The job is stored durably before this returns. Hardware costs money: estimate_job first. Above
        the policy's confirm threshold the person at your client is asked to approve; a client that
        cannot ask gets `approval_required` and the job waits for an operator. Then call wait_for_job
        (or read or subscribe to the returned `uri`) for the counts. 'aer/simulator' is free.
        """

        async def run(who: Any, state: Any) -> models.Submitted:
            request = admission.JobRequest.from_args(
                circuit=circuit,
                circuits=circuits,
                backend=backend,
                shots=shots,
                max_cost_usd=max_cost_usd,
                name=name,
                idempotency_key=idempotency_key,
                priority=priority,
                dry_run=dry_run,
            )
            answer = _answer(approval)
            try:
                result = await admission.submit_job(gateway, who, request, state.entry(), answer, memo=state.memo)
            except GatewayError as exc:
                if exc.code == "approval_required":  # the job row and its audit row were written together
                    state.audited = True
                raise
            state.audited, state.job_id = not result.idempotent_replay, result.job_id
            return result

        return await calls.tool("submit", run, progress=_progress(ctx))

    @mcp.tool(title="Get a job", annotations=READ_ONLY)
    async def get_job(
        job_id: JobIdArg,
        ctx: Context,
        timeline: Annotated[
            bool,
            Field(
                description="Also list the job's events in order: admitted, held/approved, claimed, each retried "
                "provider call with its provider code and wait, running, the end with what it cost."
            ),
        ] = False,
    ) -> Annotated[CallToolResult, models.JobView]:
        """Read one of your jobs now: state, timestamps, attempts, error, and the counts once it succeeded.

        Large results are summarised to the most frequent outcomes, with `full_result_uri` for all.
        With `timeline`, the job's history too (why it waited, what failed and was retried).
        """
        current_call().job_id = job_id[:64]
        return await calls.tool(
            "read",
            lambda who, _: service.get_job(gateway, who, job_id, timeline=timeline),
            progress=_progress(ctx),
        )

    @mcp.tool(title="Wait for a job", annotations=READ_ONLY)
    async def wait_for_job(
        job_id: JobIdArg,
        ctx: Context,
        timeout_s: Annotated[float, Field(description="Seconds to wait, 0 to 600.")] = 60,
    ) -> Annotated[CallToolResult, models.JobView]:
        """Wait until one of your jobs ends or `timeout_s` passes, then return it like get_job.

        Sends a progress notification at each state change while it waits. If it returns with
        `terminal` false, the job is still going: call again.
        """
        state = current_call()
        state.job_id = job_id[:64]

        async def progress(step: float, message: str) -> None:
            await ctx.report_progress(step, None, message)
            if not state.follows(job_id):  # a job followed by the connection is logged there already
                await state.log("info", {"event": "job_state", "job_id": job_id[:64], "message": message})

        return await calls.tool("read", lambda who, _: service.wait_for_job(gateway, who, job_id, timeout_s, progress))

    @mcp.tool(
        title="Cancel a job",
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=False, open_world_hint=True),
    )
    async def cancel_job(job_id: JobIdArg, ctx: Context) -> Annotated[CallToolResult, models.JobView]:
        """Cancel one of your jobs. A queued job stops at once; a running one is cancelled at the provider.

        A job that already ended answers `conflict`.
        """
        current_call().job_id = job_id[:64]
        return await calls.tool(
            "cancel", lambda who, _: service.cancel_job(gateway, who, job_id), progress=_progress(ctx)
        )

    @mcp.tool(title="List your jobs", annotations=READ_ONLY)
    async def list_jobs(
        ctx: Context,
        state: Annotated[str | None, Field(description="Only jobs in this state, e.g. 'running'.")] = None,
        limit: Annotated[int, Field(description="Jobs per page, 1 to 100.")] = 20,
        cursor: Annotated[str | None, Field(description="`next_cursor` from the previous page.")] = None,
    ) -> Annotated[CallToolResult, models.JobPage]:
        """List your jobs, newest first, a page at a time."""
        return await calls.tool(
            "read", lambda who, _: service.list_jobs(gateway, who, state, limit, cursor), progress=_progress(ctx)
        )

    @mcp.tool(title="Your usage", annotations=READ_ONLY)
    async def get_usage(ctx: Context) -> Annotated[CallToolResult, models.Usage]:
        """Your jobs and shots so far, by job state."""
        return await calls.tool("read", lambda who, _: service.get_usage(gateway, who), progress=_progress(ctx))

    # -- resources --------------------------------------------------------------------------

    @mcp.resource(JOB_TEMPLATE, name="job", mime_type="application/json")
    async def job_resource(job_id: str) -> str:
        """One of your jobs, with every count once it succeeded. Subscribe to hear of each state change."""

        async def run(who: Any) -> models.JobView:
            return service.job_view(await service.owned_job(gateway, who, job_id), full=True)

        current_call().job_id = job_id[:64]
        return await calls.resource("read", f"qpu://jobs/{job_id}", run)

    @mcp.resource("qpu://backends", name="backends", mime_type="application/json")
    async def backends_resource() -> str:
        """The backends list_backends returns."""
        return await calls.resource("read", "qpu://backends", lambda who: service.list_backends(gateway, who))

    @mcp.resource("qpu://usage", name="usage", mime_type="application/json")
    async def usage_resource() -> str:
        """Your usage, as get_usage returns it."""
        return await calls.resource("read", "qpu://usage", lambda who: service.get_usage(gateway, who))

    @mcp.resource("qpu://policy", name="policy", mime_type="application/json")
    async def policy_resource() -> str:
        """The policy that applies to you: allowed backends and per-job caps, so you can plan within it."""

        async def run(who: Any) -> models.PolicyView:
            return await service.policy_view(gateway, who)

        return await calls.resource("read", "qpu://policy", run)

    # -- prompt -----------------------------------------------------------------------------

    @mcp.prompt(title="Run a circuit safely")
    async def run_circuit(
        goal: Annotated[str, Field(description="What the circuit should do.")] = "prepare and measure a Bell pair",
        backend: Annotated[
            str, Field(description="Where it should run in the end; completion offers the backends you may use.")
        ] = DEFAULT_BACKEND,
    ) -> str:
        """Walk through estimate -> simulate -> read counts for a circuit you describe, then the target backend."""
        state = current_call()
        state.ran = True
        try:
            state.require("read")
        except GatewayError as exc:
            state.refuse(exc)
            raise MCPError(INVALID_REQUEST, f"{exc.code}: {exc.message}", data=exc.body()) from None
        steps = (
            f"Goal: {goal[:500]}.\n"
            '1. Write the circuit as OpenQASM 2.0 (include "qelib1.inc") or 3.0 (include "stdgates.inc"), '
            "and measure every qubit whose value you need.\n"
            f"2. Call estimate_job with it on backend '{DEFAULT_BACKEND}'. If `admitted` is false, read "
            "`refusal.message` and fix the circuit or the shots.\n"
            "3. Call submit_job with the same arguments; keep the job_id.\n"
            "4. Call wait_for_job with that job_id; repeat while `terminal` is false.\n"
            "5. Read `result.counts`: one entry per circuit, classical register -> {bitstring: count}. "
            "Explain what the counts say about the goal.\n"
        )
        if backend == DEFAULT_BACKEND:
            return steps + (
                "Only after the simulation looks right, consider a hardware backend: estimate_job it first, "
                "because hardware costs money."
            )
        return steps + (
            f"6. Once the simulation looks right, call estimate_job on backend '{backend[:100]}': hardware "
            "costs money, so read `cost_usd`, `approval` and `quota_after`, and tell the person what it will "
            "cost. Only if it is admitted and worth it, submit_job there and wait for it as in 4."
        )

    # -- completion -------------------------------------------------------------------------

    async def complete(ctx: ServerRequestContext[Any, Any], params: CompleteRequestParams) -> CompleteResult:
        """Your own job ids for qpu://jobs/{job_id}; the backends you may use for run_circuit's backend."""
        ref, argument = params.ref, params.argument
        if isinstance(ref, ResourceTemplateReference) and ref.uri == JOB_TEMPLATE and argument.name == "job_id":
            values, more = await calls.read(
                "read", lambda who: service.job_id_completions(gateway, who, argument.value)
            )
        elif isinstance(ref, PromptReference) and ref.name == "run_circuit" and argument.name == "backend":
            values, more = await calls.read(
                "estimate", lambda who: service.backend_completions(gateway, who, argument.value)
            )
        else:
            current_call().ran = True
            values, more = [], False
        return CompleteResult(completion=Completion(values=values, total=None if more else len(values), has_more=more))

    # -- 2025-era resource subscriptions --------------------------------------------------------

    async def subscribe(ctx: ServerRequestContext[Any, Any], params: SubscribeRequestParams) -> EmptyResult:
        job_id = job_id_of(params.uri)
        state = current_call()
        state.ran, state.job_id = True, job_id
        try:
            who = state.require("read")
            if job_id is None:
                if params.uri not in STATIC_RESOURCES:
                    raise MCPError(INVALID_PARAMS, f"Unknown resource: {params.uri[:200]}")
                return EmptyResult()
            job = await service.owned_job(gateway, who, job_id)
        except GatewayError as exc:
            state.refuse(exc)
            code = INVALID_PARAMS if exc.code == "not_found" else INVALID_REQUEST
            raise MCPError(code, f"{exc.code}: {exc.message}", data=exc.body()) from None
        if job.state not in TERMINAL:  # a finished job will not change again
            gateway.events.subscribe_legacy(params.uri, ctx.session, job.version)
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Any, Any], params: UnsubscribeRequestParams) -> EmptyResult:
        current_call().ran = True
        gateway.events.unsubscribe_legacy(params.uri, ctx.session)
        return EmptyResult()

    # -- 2025-era log level (2026-07-28 asks per request, in _meta; see server/mcp/session_logs.py) ---

    async def set_level(ctx: ServerRequestContext[Any, Any], params: SetLevelRequestParams) -> EmptyResult:
        calls.logs.set_level(ctx, params.level)
        return EmptyResult()

    # The SDK's MCPServer has no public hook for resources/subscribe or logging/setLevel (and its
    # completion decorator is untyped).
    lowlevel = mcp._lowlevel_server
    lowlevel.add_request_handler("completion/complete", CompleteRequestParams, complete)
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
    lowlevel.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
    return mcp
