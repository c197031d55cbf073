"""The local Qiskit Aer simulator: free, always there, the default backend and the dry-run path."""

from __future__ import annotations

import threading
from typing import Any

from qpu_gateway.adapters import qasm, sdk_thread
from qpu_gateway.adapters.base import (
    Backend,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    ProviderStatus,
    RegisterCounts,
    Result,
)

BACKEND_ID = "aer/simulator"


class AerAdapter:
    """Runs jobs on Aer's SamplerV2 in a worker thread; results are held in memory until read."""

    provider = "aer"

    def __init__(self) -> None:
        self._finished: dict[str, Result] = {}
        self._max_qubits: int | None = None
        self._lock = threading.Lock()
        self.executions = 0  # how many jobs this adapter actually simulated (tests count re-runs)

    async def backends(self) -> list[Backend]:
        if self._max_qubits is None:
            self._max_qubits = await sdk_thread.run_sync(_aer_max_qubits)
        return [
            Backend(
                id=BACKEND_ID,
                provider=self.provider,
                name="simulator",
                qubits=self._max_qubits,
                simulator=True,
                status="online",
            )
        ]

    async def submit(self, job: JobSpec) -> ProviderRef:
        # Abandoned on cancel: a shutdown does not wait for a long simulation to finish.
        result = await sdk_thread.run_sync(lambda: self._run(job))
        self._finished[job.job_id] = result
        return ProviderRef(provider_job_id=job.job_id)

    async def status(self, ref: ProviderRef) -> ProviderStatus:
        if ref.provider_job_id in self._finished:
            return ProviderStatus(ProviderState.DONE)
        # A local run lives only in the process that ran it; another process must run it again.
        return ProviderStatus(ProviderState.UNKNOWN, "the simulation ran in a process that has stopped")

    async def result(self, ref: ProviderRef) -> Result:
        try:
            return self._finished.pop(ref.provider_job_id)
        except KeyError:
            raise PermanentError("no result held for this job") from None

    async def cancel(self, ref: ProviderRef) -> None:
        self._finished.pop(ref.provider_job_id, None)

    def _run(self, job: JobSpec) -> Result:
        from qiskit_aer.primitives import SamplerV2

        with self._lock:
            self.executions += 1
        try:
            circuits = [qasm.load(source) for source in job.circuits]
        except qasm.CircuitSourceError as exc:
            raise PermanentError(str(exc)) from None
        try:
            pub_results = SamplerV2().run([(c,) for c in circuits], shots=job.shots).result()
        except Exception as exc:  # Aer raises its own and numpy's errors for circuits it cannot run
            raise PermanentError(f"Aer could not run the circuit: {str(exc).splitlines()[0][:300]}") from None
        counts = tuple(
            _register_counts(pub.data, [creg.name for creg in circuit.cregs])
            for pub, circuit in zip(pub_results, circuits, strict=True)
        )
        return Result(counts=counts, metadata={"simulator": "aer"})


def _register_counts(data: Any, registers: list[str]) -> RegisterCounts:
    return {name: dict(getattr(data, name).get_counts()) for name in registers}


def _aer_max_qubits() -> int:
    from qiskit_aer import AerSimulator

    return int(AerSimulator().configuration().n_qubits)
