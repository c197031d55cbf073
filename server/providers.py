"""Which adapters this gateway runs, and the backends they offer (cached per provider).

Every provider adapter is registered; one whose SDK is missing or whose credentials are not
configured lists its backends as unavailable with the reason, and the others work. Adapters
import their SDK only when first asked, so registering them costs nothing at start.
"""

from __future__ import annotations

import importlib
import logging
import time

import anyio

from qpu_gateway.adapters.aer import AerAdapter
from qpu_gateway.adapters.base import Adapter, Backend
from qpu_gateway.config import Config

log = logging.getLogger(__name__)

BACKEND_CACHE_TTL_S = 60.0

# Provider name -> "module:Class" of its adapter, constructed without arguments (each reads its
# own credentials from the environment, by its SDK's convention, when first used).
CLOUD_ADAPTERS = {
    "ibm": "qpu_gateway.adapters.ibm:IbmAdapter",
    "braket": "qpu_gateway.adapters.braket:BraketAdapter",
    "azure": "qpu_gateway.adapters.azure:AzureAdapter",
}


def default_adapters(config: Config) -> dict[str, Adapter]:
    adapters: dict[str, Adapter] = {"aer": AerAdapter()}
    for name, target in CLOUD_ADAPTERS.items():
        module_name, _, class_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue  # that adapter is not part of this build yet
        adapters[name] = getattr(module, class_name)()
    if config.faults:
        from qpu_gateway.adapters.faulty import FaultyAdapter

        adapters["faulty"] = FaultyAdapter(config.faults, config.faults_dir)
    return adapters


class Providers:
    """The adapters by provider name, and their backends, cached per provider for a minute."""

    def __init__(self, config: Config, adapters: dict[str, Adapter] | None = None) -> None:
        self.adapters: dict[str, Adapter] = adapters if adapters is not None else default_adapters(config)
        self._cache: dict[str, tuple[float, list[Backend]]] = {}
        self._locks: dict[str, anyio.Lock] = {}

    def adapter_for(self, backend_id: str) -> Adapter | None:
        provider, _, _ = backend_id.partition("/")
        return self.adapters.get(provider)

    async def _provider_backends(self, name: str) -> list[Backend]:
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            cached = self._cache.get(name)
            if cached is not None and time.monotonic() - cached[0] <= BACKEND_CACHE_TTL_S:
                return cached[1]
            try:
                found = await self.adapters[name].backends()
            except Exception as exc:  # one broken provider must not hide the others
                log.warning("provider %s cannot list backends: %s", name, exc)
                found = [
                    Backend(
                        id=f"{name}/*",
                        provider=name,
                        name="*",
                        qubits=None,
                        simulator=False,
                        status="unavailable",
                        reason=str(exc)[:200],
                    )
                ]
            self._cache[name] = (time.monotonic(), found)
            return found

    async def backends(self) -> list[Backend]:
        found: list[Backend] = []
        for name in self.adapters:
            found.extend(await self._provider_backends(name))
        return found

    async def backend(self, backend_id: str) -> Backend | None:
        """One backend, asking only its own provider."""
        provider, _, _ = backend_id.partition("/")
        if provider not in self.adapters:
            return None
        return next((b for b in await self._provider_backends(provider) if b.id == backend_id), None)
