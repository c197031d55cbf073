"""Errors an agent can see: one type per meaning, each with a stable code.

Every refusal reaches the agent as a tool result with `isError` and the body
`{code, message, retry_after_s?, job_id?}`; the mapping to MCP happens once, in `server.calls`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from qpu_gateway.policy.decisions import Refusal


class GatewayError(Exception):
    """Base of every coded error; `message` says what to do next and never holds a secret."""

    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.job_id = job_id

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.retry_after_s is not None:
            body["retry_after_s"] = round(self.retry_after_s, 3)
        if self.job_id is not None:
            body["job_id"] = self.job_id
        return body


class Unauthorized(GatewayError):
    code = "unauthorized"


class Forbidden(GatewayError):
    code = "forbidden"


class InvalidArguments(GatewayError):
    code = "invalid_arguments"


class InvalidCircuit(GatewayError):
    code = "invalid_circuit"


class UnsupportedBackend(GatewayError):
    code = "unsupported_backend"


class LimitExceeded(GatewayError):
    code = "limit_exceeded"


class RateLimited(GatewayError):
    code = "rate_limited"
    rule: str | None = None  # the policy rule that refused (a metric label; the message names it too)

    def by_rule(self, rule: str) -> RateLimited:
        self.rule = rule
        return self


class QuotaExhausted(GatewayError):
    code = "quota_exhausted"


class ApprovalRequired(GatewayError):
    code = "approval_required"


class ApprovalDenied(GatewayError):
    code = "approval_denied"


class LoopDetected(GatewayError):
    code = "loop_detected"


class SimulationRequired(GatewayError):
    code = "simulation_required"


class AgentPaused(GatewayError):
    """An operator paused this agent (its kill switch): every call is refused until they resume it."""

    code = "agent_paused"


class BackendPaused(GatewayError):
    """An operator paused (drained) this backend: no new jobs for it until they resume it."""

    code = "backend_paused"


class NotFound(GatewayError):
    code = "not_found"


class Conflict(GatewayError):
    code = "conflict"


class ProviderError(GatewayError):
    code = "provider_error"


class Unavailable(GatewayError):
    """Something the call needs cannot answer now: the gateway's database (busy, read-only, full) or
    a provider that cannot list its backends just now. Try again after `retry_after_s`."""

    code = "unavailable"


class InternalError(GatewayError):
    code = "internal_error"


BY_CODE: dict[str, type[GatewayError]] = {
    cls.code: cls
    for cls in (
        Unauthorized,
        Forbidden,
        InvalidArguments,
        InvalidCircuit,
        UnsupportedBackend,
        LimitExceeded,
        RateLimited,
        QuotaExhausted,
        ApprovalRequired,
        ApprovalDenied,
        LoopDetected,
        SimulationRequired,
        AgentPaused,
        BackendPaused,
        NotFound,
        Conflict,
        ProviderError,
        Unavailable,
        InternalError,
    )
}


def from_refusal(refusal: Refusal, *, job_id: str | None = None) -> GatewayError:
    """The agent-facing error for a policy refusal."""
    cls = BY_CODE.get(refusal.code, Forbidden)
    error = cls(refusal.message, retry_after_s=refusal.retry_after_s, job_id=job_id)
    if isinstance(error, RateLimited) and refusal.rule:
        error.rule = refusal.rule  # the rate-limit refusals metric's label
    return error
