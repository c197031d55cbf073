"""Admission: may this job be queued? A pure decision over facts the caller gathered."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from qpu_gateway.policy.decisions import Refusal
from qpu_gateway.policy.file import Rules


@dataclass(frozen=True, slots=True)
class JobFacts:
    """What admission needs to know about a job, measured on the parsed circuits."""

    backend: str
    shots: int
    circuits: int
    max_qubits: int
    max_depth: int
    backend_qubits: int | None
    backend_max_shots: int | None


def backend_allowed(rules: Rules, backend: str) -> bool:
    """Whether `backend` matches one of the policy's allowed patterns."""
    return any(fnmatchcase(backend, pattern) for pattern in rules.allowed_backends)


def check_job(rules: Rules, job: JobFacts) -> Refusal | None:
    """Return the first rule the job breaks, or None when the per-job caps admit it."""
    if not backend_allowed(rules, job.backend):
        return Refusal(
            "forbidden",
            f"Backend {job.backend!r} is not allowed by the policy (allowed: "
            f"{', '.join(rules.allowed_backends)}). Pick an allowed backend from list_backends.",
            rule="allowed_backends",
        )
    if job.circuits > rules.max_circuits:
        return Refusal(
            "limit_exceeded",
            f"{job.circuits} circuits in one job; the policy allows at most {rules.max_circuits}. "
            "Split the sweep into several jobs.",
            rule="max_circuits",
        )
    shot_cap = rules.max_shots if job.backend_max_shots is None else min(rules.max_shots, job.backend_max_shots)
    if not 1 <= job.shots <= shot_cap:
        return Refusal(
            "limit_exceeded",
            f"shots must be between 1 and {shot_cap} for {job.backend}; got {job.shots}.",
            rule="max_shots",
        )
    if job.max_qubits > rules.max_qubits:
        return Refusal(
            "limit_exceeded",
            f"The circuit uses {job.max_qubits} qubits; the policy allows at most {rules.max_qubits}.",
            rule="max_qubits",
        )
    if job.backend_qubits is not None and job.max_qubits > job.backend_qubits:
        return Refusal(
            "limit_exceeded",
            f"The circuit uses {job.max_qubits} qubits; {job.backend} has {job.backend_qubits}.",
            rule="backend_qubits",
        )
    if job.max_depth > rules.max_depth:
        return Refusal(
            "limit_exceeded",
            f"The circuit has depth {job.max_depth}; the policy allows at most {rules.max_depth}. "
            "Simplify the circuit or split it.",
            rule="max_depth",
        )
    return None
