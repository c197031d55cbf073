"""Rate limits: the policy's rules counted with the `limits` library, in a storage chosen by URI.

The strategy is the moving window (exact: every hit in the last period counts). Counts live
where the storage URI says: by default the gateway's own SQLite file (`async+qpu-sqlite://`, see
`server/store/rate_storage.py`), so every process sharing the database shares the allowance; with
replicas on several machines, `async+redis://host:6379`.

A PostgreSQL store has no file of the gateway's to keep counts in, and its replicas may be on
several machines: it needs a storage they all reach (`async+redis://`, named by
QPU_GATEWAY_RATE_STORAGE), and the gateway refuses to start without one rather than give each
replica an allowance of its own. Keys are prefixed with the database's installation id there, so
two installations sharing one Redis never share counts.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import anyio
import limits
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string

from qpu_gateway.config import ENV_RATE_STORAGE, Config
from qpu_gateway.errors import RateLimited, Unavailable
from qpu_gateway.keys import Principal
from qpu_gateway.policy.file import RateRule, Rules
from qpu_gateway.store.rate_storage import storage_uri

log = logging.getLogger(__name__)

Progress = Callable[[float, str], Awaitable[None]]

# A Redis that does not answer within this long counts as down: the call is answered `unavailable`
# rather than held (redis-py waits for ever by default, and a call would hang with it).
REDIS_TIMEOUT_S = 2.0
# What an agent is told to wait while the rate-limit storage is down: long enough not to hammer a
# Redis that is restarting, short enough that work resumes soon after it is back.
STORAGE_RETRY_S = 5.0
STORAGE_DOWN = (
    "The gateway's rate-limit storage did not answer, so this call could not be counted against its "
    "limits and was not run. Try again after {retry} s; tell the operator if it persists."
)


# Storages that live in one process or on one machine's disk: not shared by replicas elsewhere.
_LOCAL_SCHEMES = ("memory", "async+memory", "async+qpu-sqlite")


class RateStorageRefused(ValueError):
    """The rate-limit storage cannot be shared by the store's replicas: the gateway must not start."""


def default_storage_uri(db_path: Path) -> str:
    return storage_uri(db_path)


def storage_uri_for(config: Config) -> str:
    """The rate-limit storage this configuration uses; refused for a PostgreSQL store unless shared."""
    uri = config.rate_storage
    if not config.database.is_postgres:
        return uri or default_storage_uri(config.db_path)
    scheme = (uri or "").split("://", 1)[0]
    if uri is None or scheme in _LOCAL_SCHEMES:
        raise RateStorageRefused(
            f"The gateway database {config.database} is PostgreSQL, shared by replicas that may run on several "
            "machines, so rate limits must be counted where every replica counts them: set "
            f"{ENV_RATE_STORAGE}=async+redis://HOST:6379 (the same for every replica)"
            + (f"; {scheme}:// is local to one machine." if uri is not None else ".")
        )
    return uri


def applicable(rules: Rules, tool: str, *, cost: str) -> list[RateRule]:
    """The rules that count this tool call, with this kind of cost ('calls' or 'shots')."""
    return [r for r in rules.rate_limits if r.cost == cost and ("*" in r.tools or tool in r.tools)]


class RateLimiter:
    def __init__(self, uri: str, *, namespace: str = "qpu") -> None:
        options: dict[str, float | str | bool] = {"wrap_exceptions": True}
        if uri.startswith("async+redis"):
            # The client reconnects by itself once Redis is back: no restart needed.
            options.update(
                implementation="redispy", socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
            )
        self.uri = uri
        self.namespace = namespace  # the first part of every key (the database's, in a shared storage)
        self.storage = storage_from_string(uri, **options)
        self.strategy = MovingWindowRateLimiter(self.storage)
        # (rule id, key) -> (until, cost): a window known to be spent. In a moving window the count
        # cannot fall below the limit before its oldest hit leaves (the reset time the storage
        # reported), whatever other processes do, so until then a call of at least that cost is
        # refused here without asking the storage: a looping agent costs no storage write per call.
        # The rule id names the limit, so an operator who raises it is not held to the old one.
        self._spent: dict[tuple[str, str], tuple[float, int]] = {}

    async def aclose(self) -> None:
        close = getattr(self.storage, "aclose", None)
        if close is not None:
            await close()

    async def enforce(
        self,
        rules: Iterable[RateRule],
        who: Principal,
        *,
        backend: str | None,
        cost: int = 1,
        progress: Progress | None = None,
    ) -> None:
        """Count one call (or `cost` shots) against each rule; refuse, or wait, when one is spent."""
        ordered = list(rules)
        counted = await self._hit_together(ordered, who, backend, cost)
        for rule in ordered[counted:]:
            await self._enforce_one(rule, who, backend, cost, progress)

    async def _hit_together(self, rules: list[RateRule], who: Principal, backend: str | None, cost: int) -> int:
        """Hit the rules in one storage call where the storage can (the SQLite one: one statement for
        all of them); how many leading rules that counted. The rest, from the first without room,
        take the one-by-one path, which refuses or waits as its rule says: the outcome is the same
        as hitting each in turn. Rules already known to be spent, and storages without such a call,
        are left to that path."""
        several = getattr(self.storage, "acquire_entries", None)
        if several is None or len(rules) < 2 or cost < 1:
            return 0
        entries: list[tuple[str, int, int, int]] = []
        now = time.time()
        for rule in rules:
            item = _parse(rule.limit)
            key = _key(rule, who, backend)
            spent_until, spent_cost = self._spent.get((rule.id, key), (0.0, 0))
            if cost > item.amount or (spent_until > now and cost >= spent_cost):
                break
            entries.append((item.key_for(self.namespace, rule.id, key), item.amount, item.get_expiry(), cost))
        if len(entries) < 2:
            return 0
        try:
            return int(await several(entries))
        except StorageError as exc:
            raise self._down(exc) from None

    async def _enforce_one(
        self, rule: RateRule, who: Principal, backend: str | None, cost: int, progress: Progress | None
    ) -> None:
        item = _parse(rule.limit)
        key = _key(rule, who, backend)
        if cost > item.amount:
            raise RateLimited(
                f"This call counts {cost} against the limit {rule.limit} ({rule.per}), which can never admit it. "
                "Split the job.",
                retry_after_s=None,
            ).by_rule(rule.id)
        deadline = time.monotonic() + rule.max_wait_s
        waited = 0
        while True:
            spent_until, spent_cost = self._spent.get((rule.id, key), (0.0, 0))
            if spent_until > time.time() and cost >= spent_cost:
                retry_after = spent_until - time.time()
            elif await self._hit(item, rule, key, cost):
                return
            else:
                stats = await self._stats(item, rule, key)
                retry_after = max(stats.reset_time - time.time(), 0.05)
                self._spent[(rule.id, key)] = (time.time() + retry_after, cost)
                self._forget_old()
            if rule.mode == "reject" or time.monotonic() + retry_after > deadline:
                log.info("rate limited", extra={"rule": rule.id, "agent": who.agent, "retry_after_s": retry_after})
                raise RateLimited(
                    f"Rate limit {rule.limit} per {rule.per} reached (rule {rule.id}). Retry after "
                    f"{math.ceil(retry_after)} s; if you are looping, stop and check your earlier results.",
                    retry_after_s=retry_after,
                ).by_rule(rule.id)
            waited += 1
            if progress is not None:
                await progress(waited, f"waiting {retry_after:.1f} s for rate limit {rule.limit} per {rule.per}")
            await anyio.sleep(retry_after)

    async def _hit(self, item: limits.RateLimitItem, rule: RateRule, key: str, cost: int) -> bool:
        """Count the hit in the storage; a storage that cannot answer refuses the call (never admits it
        uncounted), since a limit that holds only while Redis is up is no limit."""
        try:
            return await self.strategy.hit(item, self.namespace, rule.id, key, cost=cost)
        except StorageError as exc:
            raise self._down(exc) from None

    async def _stats(self, item: limits.RateLimitItem, rule: RateRule, key: str) -> limits.WindowStats:
        try:
            return await self.strategy.get_window_stats(item, self.namespace, rule.id, key)
        except StorageError as exc:
            raise self._down(exc) from None

    def _down(self, exc: StorageError) -> Unavailable:
        # The storage's own error, not its URI: a Redis URI may carry a password.
        log.warning("rate-limit storage unavailable: %s", type(exc.storage_error).__name__)
        return Unavailable(STORAGE_DOWN.format(retry=math.ceil(STORAGE_RETRY_S)), retry_after_s=STORAGE_RETRY_S)

    def _forget_old(self) -> None:
        if len(self._spent) > 10_000:
            now = time.time()
            self._spent = {k: v for k, v in self._spent.items() if v[0] > now}


@functools.lru_cache(maxsize=1024)
def _parse(limit: str) -> limits.RateLimitItem:
    """The `limits` item for a rate string, parsed once (the policy's strings are few; a call checks several)."""
    return limits.parse(limit)


def _key(rule: RateRule, who: Principal, backend: str | None) -> str:
    match rule.per:
        case "agent":
            return f"agent:{who.agent}"
        case "project":
            return f"project:{who.project}"
        case "backend":
            return f"backend:{backend or '-'}"
        case _:
            return "global"
