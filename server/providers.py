"""Which adapters this gateway runs, and the backends they offer (cached)."""

from __future__ import annotations

import logging
import time

import anyio

from qpu_gateway.adapters.aer import AerAdapter
from qpu_gateway.adapters.base import Adapter, Backend
from qpu_gateway.config import Config

log = logging.getLogger(__name__)

BACKEND_CACHE_TTL_S = 60.0


class Providers:
    """The adapters by provider name; `backends()` lists every backend, cached for a minute."""

    def __init__(self, config: Config) -> None:
        self.adapters: dict[str, Adapter] = {"aer": AerAdapter()}
        if config.faults:
            from qpu_gateway.adapters.faulty import FaultyAdapter

            self.adapters["faulty"] = FaultyAdapter(config.faults)
        self._cache: list[Backend] | None = None
        self._cached_at = 0.0
        self._lock = anyio.Lock()

    def adapter_for(self, backend_id: str) -> Adapter | None:
        provider, _, _ = backend_id.partition("/")
        return self.adapters.get(provider)

    async def backends(self) -> list[Backend]:
        async with self._lock:
            if self._cache is None or time.monotonic() - self._cached_at > BACKEND_CACHE_TTL_S:
                found: list[Backend] = []
                for name, adapter in self.adapters.items():
                    try:
                        found.extend(await adapter.backends())
                    except Exception as exc:  # one broken provider must not hide the others
                        log.warning("provider %s cannot list backends: %s", name, exc)
                        found.append(
                            Backend(
                                id=f"{name}/*",
                                provider=name,
                                name="*",
                                qubits=None,
                                simulator=False,
                                status="unavailable",
                                reason=str(exc)[:200],
                            )
                        )
                self._cache, self._cached_at = found, time.monotonic()
            return list(self._cache)

    async def backend(self, backend_id: str) -> Backend | None:
        return next((b for b in await self.backends() if b.id == backend_id), None)
