"""Where the gateway keeps its state and how it runs: flags, then environment, then defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

ENV_DB = "QPU_GATEWAY_DB"
ENV_POLICY = "QPU_GATEWAY_POLICY"
ENV_KEY = "QPU_GATEWAY_KEY"
ENV_FAULTS = "QPU_GATEWAY_FAULTS"
ENV_FAULTS_DIR = "QPU_GATEWAY_FAULTS_DIR"
ENV_LEASE = "QPU_GATEWAY_LEASE_S"
ENV_RATE_STORAGE = "QPU_GATEWAY_RATE_STORAGE"
# Timings an operator (or the chaos suite) may tune per process without a flag for each.
ENV_SECONDS = {
    ENV_LEASE: "lease_s",
    "QPU_GATEWAY_POLL_S": "poll_interval_s",
    "QPU_GATEWAY_RETRY_BASE_S": "retry_base_s",
    "QPU_GATEWAY_BREAKER_COOLDOWN_S": "breaker_cooldown_s",
}


def default_db_path() -> Path:
    """`$XDG_DATA_HOME/qpu-gateway/gateway.db`, with XDG's default of `~/.local/share`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qpu-gateway" / "gateway.db"


@dataclass(frozen=True)
class Config:
    db_path: Path
    policy_path: Path
    # A claimed job's lease: a worker that stops heartbeating for this long (its process died)
    # loses the job to any other process. 30 s keeps a crashed job's delay short while leaving
    # many missed heartbeats (every lease/3) before a slow-but-alive worker is overtaken.
    lease_s: float = 30.0
    poll_interval_s: float = 0.5  # how often workers look for jobs queued by other processes
    per_backend_concurrency: int = 2
    retry_max_tries: int = 5
    retry_max_time_s: float = 120.0
    retry_base_s: float = 0.5
    faults: str | None = None  # enables the fault-injecting adapter (tests only)
    faults_dir: Path | None = None  # where that adapter keeps the fake provider's shared records
    # Where rate-limit counts live: None means the gateway's own database file (shared by every
    # process on this machine); `async+redis://host:6379` shares them across machines.
    rate_storage: str | None = None
    approval_sweep_s: float = 5.0  # how often pending approvals are checked for expiry
    # A backend's breaker opens after this many transient failures in a row, and lets a probe
    # through after the cooldown: long enough for a provider blip to pass, short enough that a
    # recovered backend is used again within a minute.
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    # A failure of the gateway itself while running a job (not the job's, not the provider's): the
    # job runs again after 2 s, 4 s, 8 s, ... and fails `internal_error` at the 5th such failure,
    # so a passing fault costs a few seconds and a lasting one cannot loop a job for ever.
    internal_retry_max: int = 5
    internal_retry_base_s: float = 2.0
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def resolve(cls, *, db: str | None = None, policy: str | None = None, **overrides: object) -> Config:
        """Build from explicit flags, falling back to the environment and then the defaults."""
        db_path = Path(db or os.environ.get(ENV_DB) or default_db_path()).expanduser()
        policy_path = Path(policy or os.environ.get(ENV_POLICY) or db_path.with_name("policy.toml")).expanduser()
        env: dict[str, object] = {}
        if os.environ.get(ENV_FAULTS):
            env["faults"] = os.environ[ENV_FAULTS]
        if os.environ.get(ENV_FAULTS_DIR):
            env["faults_dir"] = Path(os.environ[ENV_FAULTS_DIR])
        for name, setting in ENV_SECONDS.items():
            if os.environ.get(name):
                env[setting] = float(os.environ[name])
        if os.environ.get(ENV_RATE_STORAGE):
            env["rate_storage"] = os.environ[ENV_RATE_STORAGE]
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls(db_path=db_path, policy_path=policy_path, **env)  # type: ignore[arg-type]
