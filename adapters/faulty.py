"""A fault-injecting adapter for tests: answers on a schedule, then runs the job on Aer.

Registered only when the configuration names a schedule (`QPU_GATEWAY_FAULTS` or
`Config.faults`), never by default. The schedule is a comma-separated list consumed one entry
per submit call: `ok`, `transient`, `quota`, `permanent`, `slow:SECONDS`. Once it runs out,
every call is `ok`.
"""

from __future__ import annotations

import threading

import anyio

from qpu_gateway.adapters.aer import AerAdapter
from qpu_gateway.adapters.base import (
    Backend,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderStatus,
    QuotaError,
    Result,
    TransientError,
)

# It stands in for a provider's hardware, so policy on hardware (prices, approvals,
# simulate-first) can be exercised without a cloud.
BACKEND_ID = "faulty/qpu"
_KINDS = {"ok", "transient", "quota", "permanent", "slow"}


def parse_schedule(text: str) -> list[tuple[str, float]]:
    """`"transient,slow:0.5,ok"` -> [("transient", 0), ("slow", 0.5), ("ok", 0)]."""
    steps: list[tuple[str, float]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        kind, _, arg = item.partition(":")
        if kind not in _KINDS:
            raise ValueError(f"unknown fault {kind!r}; use one of {', '.join(sorted(_KINDS))}")
        steps.append((kind, float(arg) if arg else 0.0))
    return steps


class FaultyAdapter:
    """Wraps `AerAdapter`; each submit first takes the next scheduled fault."""

    provider = "faulty"

    def __init__(self, schedule: str) -> None:
        self._steps = parse_schedule(schedule)
        self._aer = AerAdapter()
        self._lock = threading.Lock()
        self.submits = 0  # every submit call, faulted or not

    @property
    def executions(self) -> int:
        return self._aer.executions

    def _next(self) -> tuple[str, float]:
        with self._lock:
            self.submits += 1
            return self._steps.pop(0) if self._steps else ("ok", 0.0)

    async def backends(self) -> list[Backend]:
        (aer,) = await self._aer.backends()
        return [
            Backend(
                id=BACKEND_ID,
                provider=self.provider,
                name="qpu",
                qubits=aer.qubits,
                simulator=False,
                status="online",
            )
        ]

    async def submit(self, job: JobSpec) -> ProviderRef:
        kind, arg = self._next()
        if kind == "transient":
            raise TransientError("injected transient fault (HTTP 503 from the provider)")
        if kind == "quota":
            raise QuotaError("injected provider quota fault: monthly allocation used up")
        if kind == "permanent":
            raise PermanentError("injected permanent fault: the provider rejected the circuit")
        if kind == "slow":
            await anyio.sleep(arg)
        return await self._aer.submit(job)

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        return await self._aer.status(ref)

    async def result(self, ref: ProviderRef) -> Result:
        return await self._aer.result(ref)

    async def cancel(self, ref: ProviderRef) -> None:
        await self._aer.cancel(ref)
