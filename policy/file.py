"""The policy file: TOML the operator edits, parsed into typed rules.

This issue reads the per-job caps and the allowed backends; later sections (rate limits,
quotas, approvals) extend `Rules` without changing how the file is found or loaded.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError


class Rules(BaseModel):
    """The rules that apply to one agent. Every key is optional in the file; these are the defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_backends: tuple[str, ...] = Field(
        default=("aer/*",), description="Backend ids an agent may use; shell-style wildcards ('aer/*')."
    )
    max_qubits: StrictInt = Field(default=24, ge=1, le=10_000, description="Most qubits one circuit may use.")
    max_depth: StrictInt = Field(default=10_000, ge=1, description="Deepest circuit accepted, after parsing.")
    max_shots: StrictInt = Field(default=100_000, ge=1, description="Most shots per circuit.")
    max_circuits: StrictInt = Field(default=1_000, ge=1, description="Most circuits in one job (a parameter sweep).")


class Policy(BaseModel):
    """The whole file: `[defaults]` now; `[projects.NAME]` and `[agents.NAME]` come with the policy issue."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    defaults: Rules = Rules()

    def rules_for(self, *, agent: str, project: str) -> Rules:
        """The rules in force for one agent. Only the defaults exist so far, so every agent shares them."""
        del agent, project
        return self.defaults


@dataclass(frozen=True, slots=True)
class PolicyFileError(Exception):
    """The file could not be used: where, and why, in words an operator can act on."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def default_policy_text() -> str:
    """The commented policy file that `qpu-gateway init` writes."""
    return resources.files("qpu_gateway.policy").joinpath("default_policy.toml").read_text(encoding="utf-8")


def parse_policy(text: str, *, path: str = "<policy>") -> Policy:
    """Parse policy TOML; raise `PolicyFileError` naming the line or key that is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(path, f"not valid TOML: {exc}") from None
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise PolicyFileError(path, problems) from None


def load_policy(path: Path) -> Policy:
    """Read and parse the policy file at `path`; a missing file means the built-in defaults."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Policy()
    except OSError as exc:
        raise PolicyFileError(str(path), f"cannot read: {exc.strerror}") from None
    return parse_policy(text, path=str(path))
