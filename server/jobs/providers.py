"""Which adapters this gateway runs, and the backends they offer (cached per provider).

Every provider adapter is registered; one whose SDK is missing or whose credentials are not
configured lists its backends as unavailable with the reason, and the others work. Adapters
import their SDK only when first asked, so registering them costs nothing at start.

A listing is cached only when it is an answer: a provider whose `backends()` raised, or whose
answer marks entries as worth asking again (`Backend.retry_after_s`: the provider could not be
reached), is asked again after a short back-off, and in the meantime `backend(id)` answers
`unavailable` with when to retry instead of pretending the backend does not exist.
"""

from __future__ import annotations

import importlib
import logging
import math
import time

import anyio

from qpu_gateway.adapters.aer import AerAdapter
from qpu_gateway.adapters.base import LIST_RETRY_S, Adapter, AdapterError, Backend
from qpu_gateway.config import Config
from qpu_gateway.errors import Unavailable

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
        # provider -> (monotonic time until which it holds, the listing or the failure's reason)
        self._cache: dict[str, tuple[float, list[Backend] | str]] = {}
        self._locks: dict[str, anyio.Lock] = {}

    def adapter_for(self, backend_id: str) -> Adapter | None:
        provider, _, _ = backend_id.partition("/")
        return self.adapters.get(provider)

    def listed(self, backend_id: str) -> bool:
        """Whether a listing of its provider, as last read here, named `backend_id` (no I/O): a metric
        labels only backends that exist, so a caller naming new ones cannot grow the label set."""
        provider, _, _ = backend_id.partition("/")
        cached = self._cache.get(provider)
        return cached is not None and isinstance(cached[1], list) and any(b.id == backend_id for b in cached[1])

    async def _provider_backends(self, name: str) -> tuple[list[Backend] | str, float]:
        """The provider's backends, or why it could not list them; and how long that answer holds."""
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock:
            cached = self._cache.get(name)
            if cached is not None and time.monotonic() < cached[0]:
                return cached[1], cached[0] - time.monotonic()
            answer: list[Backend] | str
            try:
                answer = await self.adapters[name].backends()
            except Exception as exc:  # one broken provider must not hide the others
                log.warning(
                    "provider %s cannot list backends: %s", name, exc, exc_info=not isinstance(exc, AdapterError)
                )
                # An adapter's classified error is safe to show; anything else is named by its type only.
                answer = str(exc)[:200] if isinstance(exc, AdapterError) else f"{type(exc).__name__} in the gateway"
                holds = LIST_RETRY_S
            else:
                retries = [b.retry_after_s for b in answer if b.retry_after_s is not None]
                holds = min([BACKEND_CACHE_TTL_S, *retries])
            self._cache[name] = (time.monotonic() + holds, answer)
            return answer, holds

    async def backends(self) -> list[Backend]:
        """Every provider's backends; a provider that cannot list them now shows as one unavailable entry."""
        found: list[Backend] = []
        for name in self.adapters:
            answer, holds = await self._provider_backends(name)
            found.extend(answer if isinstance(answer, list) else [_unlisted(name, answer, holds)])
        return found

    async def backend(self, backend_id: str) -> Backend | None:
        """One backend, asking only its own provider; None if the provider does not offer it.

        Raises `Unavailable` (with `retry_after_s`) when the provider could not say just now: it
        could not list, or the backend's entry (or the entry standing for the provider's cloud
        backends) says asking again later may find it.
        """
        provider, _, _ = backend_id.partition("/")
        if provider not in self.adapters:
            return None
        answer, holds = await self._provider_backends(provider)
        if isinstance(answer, str):
            raise _unavailable(provider, answer, holds)
        found = next((b for b in answer if b.id == backend_id), None)
        # An id not listed may be one of the backends the provider could not be asked about.
        entry = found or next((b for b in answer if b.id == f"{provider}/*"), None)
        if entry is not None and entry.status == "unavailable" and entry.retry_after_s is not None:
            raise _unavailable(provider, entry.reason or "it could not be reached", holds)
        return found


def _unlisted(provider: str, reason: str, holds: float) -> Backend:
    return Backend(
        id=f"{provider}/*",
        provider=provider,
        name="*",
        qubits=None,
        simulator=False,
        status="unavailable",
        reason=f"{provider} could not list its backends ({reason}); it is asked again in {math.ceil(holds)} s.",
        retry_after_s=holds,
    )


def _unavailable(provider: str, reason: str, holds: float) -> Unavailable:
    return Unavailable(
        f"{provider} cannot say which backends it offers right now ({reason}); nothing was queued. "
        f"Try again in {math.ceil(holds)} s.",
        retry_after_s=max(1.0, holds),
    )
