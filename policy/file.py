"""The policy file: TOML the operator edits, parsed into the rules for each agent.

Levels: `[defaults]`, then `[projects.NAME]`, then `[agents.NAME]`; the most specific level
wins key by key (tables merge, lists and values replace). `[prices."pattern"]` entries replace
or add to the shipped price table; `[adaptive_admission]` is one table for every agent (it paces
backends, not agents). See `policy.example.toml` for every key.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import limits
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
)

from qpu_gateway.policy.pricing import Price, PriceError, parse_price_table, shipped_prices, to_micro_usd

Priority = Literal["low", "normal", "high"]
PRIORITY_RANK: dict[str, int] = {"low": 0, "normal": 1, "high": 2}
_DURATION = re.compile(r"^(\d+)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# A job waits at its provider (queue and run) for at most this long where no max_wall_clock
# pattern matches its backend, so no job is polled for ever. A day: longer than a QPU run, and
# than the queues we have seen, short enough that a lost job's reservation comes back the next day.
DEFAULT_WALL_CLOCK_S = 86_400


def parse_duration(value: str | int) -> int:
    """`"24h"` / `"30m"` / `90` -> seconds."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = _DURATION.match(str(value).strip())
    if match is None or int(match.group(1)) <= 0:
        raise ValueError("a duration is a positive number with a unit: 90s, 30m, 24h, 7d")
    return int(match.group(1)) * _UNITS[match.group(2)]


Duration = Annotated[int, BeforeValidator(lambda value: parse_duration(value))]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateRule(_Strict):
    """One rate limit: `limit` per `per` key, on `tools`, counting calls or shots."""

    limit: str = Field(description="A `limits` rate string: '60/minute', '200000/hour', '5/second'.")
    per: Literal["agent", "project", "backend", "global"] = "agent"
    tools: tuple[str, ...] = ("submit_job",)
    cost: Literal["calls", "shots"] = "calls"
    mode: Literal["reject", "wait"] = "reject"
    max_wait_s: float = Field(default=30.0, gt=0, le=600)
    name: str | None = None

    @field_validator("limit")
    @classmethod
    def _parses(cls, value: str) -> str:
        try:
            limits.parse(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a rate like '60/minute': {exc}") from None
        return value

    @property
    def id(self) -> str:
        """Stable identity of the rule, used in counters' keys and audit rows."""
        return self.name or f"{self.per}:{','.join(self.tools)}:{self.cost}:{self.limit}"


class PeriodCaps(_Strict):
    """A cap per UTC period; a missing period has no cap."""

    day: Decimal | None = None
    month: Decimal | None = None
    total: Decimal | None = None

    @field_validator("day", "month", "total", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("must be a number")
        try:
            number = Decimal(str(value))
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a number") from None
        if not number.is_finite() or number < 0:
            raise ValueError("must be a number of zero or more")
        return number


class Quota(_Strict):
    """Caps for one agent, or for one project's agents together."""

    cost_usd: PeriodCaps = PeriodCaps()
    shots: PeriodCaps = PeriodCaps()
    qpu_seconds: PeriodCaps = PeriodCaps()
    running_jobs: StrictInt | None = Field(default=None, ge=0)
    queued_jobs: StrictInt | None = Field(default=None, ge=0)

    @field_validator("shots")
    @classmethod
    def _whole_shots(cls, caps: PeriodCaps) -> PeriodCaps:
        for value in (caps.day, caps.month, caps.total):
            if value is not None and value != value.to_integral_value():
                raise ValueError("a shots cap is a whole number")
        return caps

    @field_validator("cost_usd")
    @classmethod
    def _whole_micro_dollars(cls, caps: PeriodCaps) -> PeriodCaps:
        for value in (caps.day, caps.month, caps.total):
            if value is not None:
                to_micro_usd(value, "cost_usd")
        return caps


class LoopGuard(_Strict):
    max_repeats: StrictInt = Field(default=50, ge=1)
    window_minutes: StrictInt = Field(default=10, ge=1)


class StormAlert(_Strict):
    """Alert the operator when one agent has this many calls refused within the window."""

    refused_calls: StrictInt = Field(default=100, ge=1)
    window_seconds: StrictInt = Field(default=60, ge=1)


class AdaptiveAdmission(_Strict):
    """How fast new jobs to an unhealthy backend are admitted (see policy/adaptive.py)."""

    enabled: StrictBool = True
    window: Duration = 60  # the error rate is over the calls of the last `window`
    error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    min_calls: StrictInt = Field(default=10, ge=1)  # fewer calls in the window: no rate is judged
    error_rate_interval: Duration = 2  # between new jobs at the threshold; longer as the rate rises
    half_open_interval: Duration = 10
    open_interval: Duration = 30


class Rules(_Strict):
    """The rules that apply to one agent; every key is optional in the file."""

    allowed_backends: tuple[str, ...] = Field(
        default=("aer/*",), description="Backend ids an agent may use; shell-style wildcards ('aer/*')."
    )
    max_qubits: StrictInt = Field(default=24, ge=1, le=10_000)
    max_depth: StrictInt = Field(default=10_000, ge=1)
    max_shots: StrictInt = Field(default=100_000, ge=1)
    max_circuits: StrictInt = Field(default=1_000, ge=1)
    rate_limits: tuple[RateRule, ...] = ()
    agent_quota: Quota = Quota()
    project_quota: Quota = Quota()
    confirm_above_usd: Decimal | None = None
    operator_above_usd: Decimal | None = None
    unknown_price: Literal["refuse", "operator"] = "operator"
    approval_ttl: int = Field(default=86_400, description="Seconds a pending approval waits before it expires.")
    priority_ceiling: Priority = "normal"
    simulate_first: StrictBool = False
    loop_guard: LoopGuard = LoopGuard()
    storm_alert: StormAlert = StormAlert()
    max_wall_clock: dict[str, Duration] = Field(
        default={"*": DEFAULT_WALL_CLOCK_S},
        description="Backend id or pattern -> how long a job may stay at its provider (queued and running) "
        "before it is cancelled there and fails with `timeout`; the exact id, else the longest matching "
        f"pattern, wins; unmatched backends get {DEFAULT_WALL_CLOCK_S} s.",
    )

    @field_validator("max_wall_clock")
    @classmethod
    def _patterns(cls, table: dict[str, int]) -> dict[str, int]:
        for pattern in table:
            if not pattern.strip() or len(pattern) > 200:
                raise ValueError(f"{pattern[:40]!r} is not a backend id or pattern (like 'ibm/*')")
        # Every backend has a cap, and the effective policy an agent reads says which.
        return table if "*" in table else {"*": DEFAULT_WALL_CLOCK_S, **table}

    def wall_clock_s(self, backend: str) -> int:
        """Seconds a job on `backend` may stay at its provider: `max_wall_clock`'s exact entry for it,
        else its longest matching pattern's, else DEFAULT_WALL_CLOCK_S."""
        table = self.max_wall_clock
        if backend in table:
            return table[backend]
        matching = sorted((p for p in table if fnmatch.fnmatchcase(backend, p)), key=lambda p: (-len(p), p))
        return table[matching[0]] if matching else DEFAULT_WALL_CLOCK_S

    @field_validator("confirm_above_usd", "operator_above_usd", mode="before")
    @classmethod
    def _usd(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool):
            raise ValueError("must be an amount in USD")
        to_micro_usd(value, "threshold")
        return Decimal(str(value))

    @field_validator("approval_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> int:
        return parse_duration(value)

    def micro(self, name: Literal["confirm_above_usd", "operator_above_usd"]) -> int | None:
        value = getattr(self, name)
        return None if value is None else to_micro_usd(value)


NotificationEvent = Literal["approval_needed", "storm", "budget", "breaker"]
NOTIFICATION_EVENTS: tuple[NotificationEvent, ...] = ("approval_needed", "storm", "budget", "breaker")
_HOOK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,59}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class Webhook(_Strict):
    """One receiver of the gateway's notifications: where, in which shape, which events, signed how."""

    name: str = Field(description="Names the hook in the outbox, the log and the audit (never its URL).")
    url: str = Field(description="http(s) URL POSTed to; it may hold a secret (Slack's do): never shown whole.")
    format: Literal["json", "slack"] = "json"
    events: tuple[NotificationEvent, ...] = NOTIFICATION_EVENTS
    secret_env: str | None = Field(
        default=None, description="The environment variable holding the HMAC-SHA256 signing secret."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _HOOK_NAME.match(value):
            raise ValueError("a webhook name is 1-60 letters, digits, '.', '_' or '-'")
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        scheme, _, rest = value.partition("://")
        if scheme not in ("http", "https") or not rest.split("/", 1)[0]:
            raise ValueError("a webhook url is http:// or https:// with a host")  # the URL itself is not repeated
        return value

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.match(value):
            raise ValueError("secret_env names an environment variable (the secret itself never goes in the file)")
        return value


class Notifications(_Strict):
    """`[notifications]`: the webhooks, and the fractions of a cost cap whose crossing is an event."""

    webhooks: tuple[Webhook, ...] = ()
    budget_thresholds: tuple[Decimal, ...] = (Decimal("0.8"), Decimal("1"))

    @field_validator("webhooks")
    @classmethod
    def _unique(cls, hooks: tuple[Webhook, ...]) -> tuple[Webhook, ...]:
        names = [hook.name for hook in hooks]
        if len(set(names)) != len(names):
            raise ValueError("two webhooks have the same name")
        return hooks

    @field_validator("budget_thresholds", mode="before")
    @classmethod
    def _fractions(cls, values: Any) -> Any:
        if not isinstance(values, list | tuple):
            raise ValueError("a list of fractions of a cap, like [0.8, 1.0]")
        out = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
                raise ValueError("a threshold is a number")
            number = Decimal(str(value))
            if not number.is_finite() or not 0 < number <= 10:
                raise ValueError("a threshold is a fraction of the cap above 0 (1.0 is the cap itself)")
            out.append(number)
        return tuple(sorted(set(out)))

    def hook(self, name: str) -> Webhook | None:
        return next((hook for hook in self.webhooks if hook.name == name), None)

    def hooks_for(self, event: str) -> list[Webhook]:
        return [hook for hook in self.webhooks if event in hook.events]


class Policy:
    """The parsed file: raw levels (merged per agent on demand) and the price table."""

    def __init__(self, levels: dict[str, Any] | None = None, prices: dict[str, Price] | None = None) -> None:
        levels = levels or {}
        self._defaults: dict[str, Any] = dict(levels.get("defaults") or {})
        self._projects: dict[str, dict[str, Any]] = dict(levels.get("projects") or {})
        self._agents: dict[str, dict[str, Any]] = dict(levels.get("agents") or {})
        self.prices: dict[str, Price] = {**shipped_prices(), **(prices or {})}
        self.adaptive_admission = AdaptiveAdmission.model_validate(levels.get("adaptive_admission") or {})
        self._cache: dict[tuple[str, str], Rules] = {}
        self.defaults = Rules.model_validate(self._defaults)
        self.notifications = Notifications.model_validate(levels.get("notifications") or {})

    def rules_for(self, *, agent: str, project: str) -> Rules:
        """The merged rules for one agent: defaults, then its project's, then its own."""
        key = (agent, project)
        rules = self._cache.get(key)
        if rules is None:
            merged = _merge(_merge(self._defaults, self._projects.get(project, {})), self._agents.get(agent, {}))
            # A project's shared pool is the project's to set, never an agent's.
            merged["project_quota"] = _merge(
                self._defaults.get("project_quota", {}), self._projects.get(project, {}).get("project_quota", {})
            )
            rules = self._cache[key] = Rules.model_validate(merged)
        return rules

    def project_rules(self, project: str) -> Rules:
        return Rules.model_validate(_merge(self._defaults, self._projects.get(project, {})))

    @property
    def names(self) -> tuple[list[str], list[str]]:
        return sorted(self._projects), sorted(self._agents)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


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


_TOP_LEVEL = {"defaults", "projects", "agents", "prices", "adaptive_admission", "notifications"}


def parse_policy(text: str, *, path: str = "<policy>", overrides: dict[str, Any] | None = None) -> Policy:
    """Parse and validate policy TOML; raise `PolicyFileError` naming the line and the reason.

    `overrides` (what `qpu-gateway quota set` wrote) are merged over the file before validation.
    """
    try:
        raw = _merge(tomllib.loads(text), overrides or {})
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(path, f"not valid TOML: {exc}") from None
    unknown = set(raw) - _TOP_LEVEL
    if unknown:
        name = sorted(unknown)[0]
        raise PolicyFileError(
            path, f"{_line_of(text, [name])}unknown section or key {name!r} (use {', '.join(sorted(_TOP_LEVEL))})"
        )
    adaptive = raw.get("adaptive_admission", {})
    try:
        AdaptiveAdmission.model_validate(adaptive)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ["adaptive_admission", *(str(p) for p in err["loc"])]
        raise PolicyFileError(path, f"{_line_of(text, loc)}{'.'.join(loc)}: {err['msg']}") from None
    levels: list[tuple[list[str], Any]] = [(["defaults"], raw.get("defaults", {}))]
    for section in ("projects", "agents"):
        table = raw.get(section, {})
        if not isinstance(table, dict):
            raise PolicyFileError(path, f"[{section}] must be a table of names")
        levels += [([section, name], value) for name, value in table.items()]
    for where, value in levels:
        if not isinstance(value, dict):
            raise PolicyFileError(path, f"{_line_of(text, where)}{'.'.join(where)} must be a table")
        if where[0] == "agents" and "project_quota" in value:
            loc = [*where, "project_quota"]
            raise PolicyFileError(
                path,
                f"{_line_of(text, loc)}{'.'.join(loc)}: a project's quota is set in "
                "[defaults] or [projects.NAME], not per agent",
            )
        try:
            Rules.model_validate(value)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            loc = [*where, *(str(p) for p in err["loc"])]
            raise PolicyFileError(path, f"{_line_of(text, loc)}{'.'.join(loc)}: {err['msg']}") from None
        except (PriceError, ValueError) as exc:
            raise PolicyFileError(path, f"{_line_of(text, where)}{'.'.join(where)}: {exc}") from None
    notifications = raw.get("notifications", {})
    if not isinstance(notifications, dict):
        raise PolicyFileError(path, "[notifications] must be a table")
    try:
        Notifications.model_validate(notifications)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ["notifications", *(str(p) for p in err["loc"])]
        # pydantic's message only: its `input` would repeat a URL, which may hold a secret.
        raise PolicyFileError(path, f"{_line_of(text, loc)}{'.'.join(loc)}: {err['msg']}") from None
    try:
        prices = parse_price_table(raw.get("prices", {}))
        policy = Policy(raw, prices)
        for project in raw.get("projects", {}):
            policy.project_rules(project)
        for agent in raw.get("agents", {}):
            policy.rules_for(agent=agent, project="default")
    except (PriceError, ValidationError, ValueError) as exc:
        raise PolicyFileError(path, str(exc).splitlines()[0]) from None
    return policy


def _line_of(text: str, loc: list[str]) -> str:
    """'line N: ' for the deepest part of `loc` found in the file, searching in order.

    A list position N (as in rate_limits.1.limit) moves the search to the N-th inline table of
    the list, so an error in the second rule points at the second rule's line.
    """
    lines, start, found = text.splitlines(), 0, None
    for part in loc:
        if part.isdigit():
            items = [n for n in range(start, len(lines)) if "{" in lines[n].split("#", 1)[0]]
            if int(part) < len(items):
                start = items[int(part)]
            continue
        pattern = re.compile(rf'(^|[\s.\[{{,"]){re.escape(part)}("?\s*[=\].]|"\])')
        for number in range(start, len(lines)):
            if pattern.search(lines[number].split("#", 1)[0]):
                found, start = number, number
                break
    return f"line {found + 1}: " if found is not None else ""


def overrides_path(path: Path) -> Path:
    """Where `qpu-gateway quota set` keeps its changes: beside the policy file, never inside it."""
    return path.with_name(path.stem + ".overrides.toml")


def load_policy(path: Path) -> Policy:
    """Read and parse the policy file at `path` with its overrides; a missing file means the shipped default."""
    overrides: dict[str, Any] = {}
    extra = overrides_path(path)
    try:
        overrides = tomllib.loads(extra.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyFileError(str(extra), f"cannot read: {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return parse_policy(default_policy_text(), path="<default policy>", overrides=overrides)
    except OSError as exc:
        raise PolicyFileError(str(path), f"cannot read: {exc.strerror}") from None
    return parse_policy(text, path=str(path), overrides=overrides)
