"""Where the gateway keeps its state and how it runs: flags, then environment, then defaults."""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

ENV_DB = "QPU_GATEWAY_DB"
# Where the gateway keeps its files (default policy, local.key) when the database is not a file.
ENV_DATA_DIR = "QPU_GATEWAY_DATA_DIR"
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
    "QPU_GATEWAY_NOTIFY_RETRY_BASE_S": "notify_retry_base_s",
    "QPU_GATEWAY_NOTIFY_TIMEOUT_S": "notify_timeout_s",
    "QPU_GATEWAY_NOTIFY_POLL_S": "notify_poll_s",
}


def data_home() -> Path:
    """`$XDG_DATA_HOME/qpu-gateway`, with XDG's default of `~/.local/share`."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qpu-gateway"


def default_db_path() -> Path:
    """`$XDG_DATA_HOME/qpu-gateway/gateway.db`."""
    return data_home() / "gateway.db"


_POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_SQLITE_PREFIX = "sqlite:///"


@dataclass(frozen=True)
class Database:
    """Where the store lives: a SQLite file (the embedded default) or a PostgreSQL database.

    `str()` and `repr()` never show a password: the URL's is replaced by `[redacted]`.
    """

    path: Path | None = None  # the SQLite file
    url: str | None = None  # a postgresql:// URL, as given (password included: use `.shown`)

    @classmethod
    def parse(cls, text: str | Path) -> Database:
        """A path or `sqlite:///PATH` (SQLite), or a `postgresql://` URL; anything else is refused."""
        value = str(text).strip()
        if value.startswith(_POSTGRES_SCHEMES):
            parts = urllib.parse.urlsplit(value)
            if not parts.path.strip("/") and "dbname=" not in parts.query:
                raise ValueError(f"{redact_url(value)}: name the database (postgresql://HOST:PORT/DBNAME)")
            return cls(url=value)
        if value.startswith(_SQLITE_PREFIX):
            value = urllib.parse.unquote(value[len(_SQLITE_PREFIX) - 1 :])  # keep the path's leading '/'
        elif "://" in value:
            scheme = value.split("://", 1)[0]
            raise ValueError(
                f"unsupported database URL scheme {scheme!r}: give a path, sqlite:///PATH or postgresql://..."
            )
        if not value:
            raise ValueError("empty database path")
        # Absolute from here on: the file is opened by URI (which needs an absolute path), and every
        # message names it whatever folder the process later runs in.
        return cls(path=Path(value).expanduser().absolute())

    @property
    def is_postgres(self) -> bool:
        return self.url is not None

    @property
    def shown(self) -> str:
        """The location as logs and messages show it: the path, or the URL without its password."""
        return redact_url(self.url) if self.url is not None else str(self.path)

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"Database({self.shown!r})"

    def default_data_dir(self) -> Path:
        """The SQLite file's folder; for PostgreSQL a folder of this machine's named for the server and
        database (`$XDG_DATA_HOME/qpu-gateway/postgresql/HOST-PORT-DBNAME`), so two databases never
        share a policy or a local key by accident."""
        if self.path is not None:
            return self.path.parent
        assert self.url is not None
        parts = urllib.parse.urlsplit(self.url)
        name = f"{parts.hostname or 'local'}-{parts.port or 5432}-{parts.path.strip('/') or 'default'}"
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
        if safe != name:  # unusual characters: keep folders apart by a digest of the real name
            safe += "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
        return data_home() / "postgresql" / safe


def redact_url(text: str) -> str:
    """A URL with the password of its user part (`user:PASSWORD@`) and any `password=` option replaced."""
    from qpu_gateway.telemetry.logs import redact_credentials

    return redact_credentials(text)


@dataclass(frozen=True)
class Config:
    database: Database
    policy_path: Path
    # The gateway's own files besides the database (the default policy, `local.key`): the SQLite
    # file's folder, or for PostgreSQL $QPU_GATEWAY_DATA_DIR or `Database.default_data_dir`.
    data_dir: Path | None = None
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
    # Webhook deliveries from the outbox: a failed one is tried again after about 5 s, 10 s, 20 s, ...
    # (each wait between half and all of the doubling, at most 10 minutes), and is given up (kept,
    # marked dead) at its 10th failure: some 40 minutes in all, enough for a receiver's restart or
    # a short outage, and a dead receiver does not keep a row retrying for ever.
    notify_retry_base_s: float = 5.0
    notify_retry_max_s: float = 600.0
    notify_max_attempts: int = 10
    notify_timeout_s: float = 10.0  # one delivery, connect to answer; a slow receiver holds only its own rows
    notify_poll_s: float = 2.0  # how often the loop looks for rows other processes wrote, or now due
    notify_in_flight: int = 8  # deliveries under way at once per process
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.data_dir is None:
            object.__setattr__(self, "data_dir", self.database.default_data_dir())

    @property
    def files(self) -> Path:
        """The folder of the gateway's own files (`data_dir`, filled in by construction)."""
        assert self.data_dir is not None
        return self.data_dir

    @property
    def db_path(self) -> Path:
        """The SQLite file; a PostgreSQL store has none (code that needs a file must say so)."""
        if self.database.path is None:
            raise ValueError(f"the gateway database {self.database} is PostgreSQL, not a file")
        return self.database.path

    @classmethod
    def resolve(
        cls, *, db: str | None = None, policy: str | None = None, data_dir: str | None = None, **overrides: object
    ) -> Config:
        """Build from explicit flags, falling back to the environment and then the defaults."""
        database = Database.parse(db or os.environ.get(ENV_DB) or default_db_path())
        chosen = data_dir or os.environ.get(ENV_DATA_DIR)
        files = Path(chosen).expanduser().absolute() if chosen else database.default_data_dir()
        policy_path = Path(policy or os.environ.get(ENV_POLICY) or files / "policy.toml").expanduser().absolute()
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
        return cls(database=database, policy_path=policy_path, data_dir=files, **env)  # type: ignore[arg-type]
