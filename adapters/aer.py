"""The local Qiskit Aer simulator: free, always there, the default backend and the dry-run path.

Jobs that arrive while a simulation runs are run together in the next one (micro-batching):
Aer runs a list of circuits in one call much faster than one call per circuit (measured here,
5-qubit 100-shot circuits: 2.3 ms each one at a time, 0.7 ms each in a batch of 1,000), and
nothing waits on a timer, since a batch starts as soon as the previous one ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

from qpu_gateway.adapters import qasm, sdk_imports, sdk_thread
from qpu_gateway.adapters.base import (
    Backend,
    JobSpec,
    PermanentError,
    ProviderRef,
    ProviderState,
    ProviderStatus,
    RegisterCounts,
    Result,
    Usage,
    pass_internal,
)

BACKEND_ID = "aer/simulator"
# Below this many qubits a circuit is so cheap that Aer's OpenMP threads cost more than they
# give: on 2 cores, one 5-qubit 100-shot circuit took 3.6 ms of CPU with them and 1.6 ms on one
# thread (the same wall time batched), CPU the event loop and the other jobs need. 14 is Aer's
# own threshold for parallelising a statevector (`statevector_parallel_threshold`).
SMALL_QUBITS = 14
# Circuits parsed at admission and kept for their job's batch, at most (oldest dropped first):
# enough for a few sweeps in flight, a bound on the memory they hold.
KEPT_CIRCUITS = 5_000
# A batch holds at most this many circuits, so one huge sweep does not keep every other job
# waiting for it, and a batch's memory stays bounded.
BATCH_CIRCUITS = 2_000


class AerAdapter:
    """Runs jobs on Aer's SamplerV2 in a worker thread; results are held in memory until read."""

    provider = "aer"
    # Jobs a worker may hand this adapter at once per process: they share simulator calls.
    jobs_at_once = 32
    # `submit` returns once the simulation is done: the worker settles the job straight away.
    runs_in_submit = True

    def __init__(self) -> None:
        self._finished: dict[str, Result] = {}
        self._max_qubits: int | None = None
        self._lock = threading.Lock()
        self._waiting: list[tuple[JobSpec, Future[Result]]] = []
        self._draining = False
        self._kept: OrderedDict[str, list[Any]] = OrderedDict()  # job id -> circuits parsed at admission
        self._kept_circuits = 0
        self._samplers: dict[bool, Any] = {}  # small circuits or not -> SamplerV2; used by one drain at a time
        self.executions = 0  # how many jobs this adapter actually simulated (tests count re-runs)
        self.batches = 0  # how many simulator calls ran them

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
        # Abandoned on cancel: a shutdown does not wait for a long simulation to finish, and a
        # job cancelled before its batch starts is left out of it.
        result = await asyncio.wrap_future(self._enqueue(job))
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

    async def usage(self, ref: ProviderRef) -> Usage:
        return Usage(cost_micro_usd=0)  # a local simulation costs nothing

    def keep_parsed(self, job_id: str, circuits: list[Any]) -> None:
        """Keep the circuits admission parsed for `job_id`, so its batch need not parse the sources
        again (it parses them when nothing is kept: another process admitted it, or it was dropped)."""
        with self._lock:
            self._take_kept(job_id)
            self._kept[job_id] = circuits
            self._kept_circuits += len(circuits)
            while self._kept_circuits > KEPT_CIRCUITS and len(self._kept) > 1:
                self._take_kept(next(iter(self._kept)))

    def forget_parsed(self, job_id: str) -> None:
        """Drop what `keep_parsed` kept for a job that was not queued after all."""
        with self._lock:
            self._take_kept(job_id)

    def _take_kept(self, job_id: str) -> list[Any] | None:
        """Remove and return what is kept for `job_id` (the caller holds the lock)."""
        kept = self._kept.pop(job_id, None)
        if kept is not None:
            self._kept_circuits -= len(kept)
        return kept

    def _enqueue(self, job: JobSpec) -> Future[Result]:
        """Queue `job` for the next batch; start draining the queue if nobody is."""
        future: Future[Result] = Future()
        with self._lock:
            self._waiting.append((job, future))
            start, self._draining = not self._draining, True
        if start:
            sdk_thread.submit(self._drain)
        return future

    def _drain(self) -> None:
        """On an SDK thread: run batches of the waiting jobs until none is left."""
        try:
            while True:
                with self._lock:
                    batch = _take_batch(self._waiting)
                    if not batch:
                        return
                # A job whose submit was cancelled before its batch started is left out.
                self._run_batch([(job, future) for job, future in batch if future.set_running_or_notify_cancel()])
        finally:
            with self._lock:
                # Jobs still waiting here were queued after the last look, or this loop died: go on.
                restart = self._draining = bool(self._waiting)
            if restart:
                sdk_thread.submit(self._drain)

    def _run_batch(self, batch: list[tuple[JobSpec, Future[Result]]]) -> None:
        """Simulate every job of `batch` in one call and give each its own result or error."""
        with self._lock:
            self.executions += len(batch)
            self.batches += 1 if batch else 0
        parsed: list[tuple[Future[Result], int, list[Any]]] = []
        for job, future in batch:
            with self._lock:
                kept = self._take_kept(job.job_id)
            if kept is not None and len(kept) == len(job.circuits):
                parsed.append((future, job.shots, kept))
                continue
            try:
                parsed.append((future, job.shots, [qasm.load(source) for source in job.circuits]))
            except qasm.CircuitSourceError as exc:
                future.set_exception(PermanentError(str(exc)))
        if not parsed:
            return
        try:
            results = self._simulate([(shots, circuits) for _, shots, circuits in parsed])
        except PermanentError as exc:
            if len(parsed) == 1:
                parsed[0][0].set_exception(exc)
                return
            # One job's circuit broke the shared call: run each on its own, so only that one fails.
            for future, shots, circuits in parsed:
                try:
                    future.set_result(self._simulate([(shots, circuits)])[0])
                except Exception as own:
                    future.set_exception(own)
            return
        except Exception as exc:
            for future, _, _ in parsed:
                future.set_exception(exc)
            return
        for (future, _, _), result in zip(parsed, results, strict=True):
            future.set_result(result)

    def _simulate(self, jobs: Sequence[tuple[int, list[Any]]]) -> list[Result]:
        """Run every job's circuits, each with its job's shots, in one SamplerV2 call."""
        small = all(circuit.num_qubits < SMALL_QUBITS for _, circuits in jobs for circuit in circuits)
        sampler = self._samplers.get(small)
        if sampler is None:
            sdk_imports.ensure("aer")
            from qiskit_aer.primitives import SamplerV2

            options = {"backend_options": {"max_parallel_threads": 1}} if small else None
            sampler = self._samplers[small] = SamplerV2(options=options)
        pubs = [(circuit, None, shots) for shots, circuits in jobs for circuit in circuits]
        try:
            pub_results = list(sampler.run(pubs).result())
        except Exception as exc:  # Aer raises its own and numpy's errors for circuits it cannot run
            pass_internal(exc)
            raise PermanentError(f"Aer could not run the circuit: {str(exc).splitlines()[0][:300]}") from None
        results, start = [], 0
        for _, circuits in jobs:
            counts = tuple(
                _register_counts(pub.data, [creg.name for creg in circuit.cregs])
                for pub, circuit in zip(pub_results[start : start + len(circuits)], circuits, strict=True)
            )
            results.append(Result(counts=counts, metadata={"simulator": "aer"}))
            start += len(circuits)
        return results


def _take_batch(waiting: list[tuple[JobSpec, Future[Result]]]) -> list[tuple[JobSpec, Future[Result]]]:
    """The oldest waiting jobs, up to BATCH_CIRCUITS circuits (at least one job), removed from `waiting`."""
    taken, circuits = 0, 0
    for job, _ in waiting:
        if taken and circuits + len(job.circuits) > BATCH_CIRCUITS:
            break
        taken += 1
        circuits += len(job.circuits)
    batch = waiting[:taken]
    del waiting[:taken]
    return batch


def _register_counts(data: Any, registers: list[str]) -> RegisterCounts:
    return {name: _counts(getattr(data, name)) for name in registers}


def _counts(bits: Any) -> dict[str, int]:
    """A register's {bitstring: count}, as Qiskit's `BitArray.get_counts` gives it (same keys, same
    order), with the shots tallied in C by their bytes instead of one Python call per shot: a
    5-bit register of 100 shots took 67 us that way and 15 us this way."""
    rows = bits.array.reshape(-1, bits.array.shape[-1])
    width = rows.shape[1]
    if width == 0:
        return dict(bits.get_counts())
    raw = rows.tobytes()
    # Each shot is `width` bytes, most significant first; one byte tallies as its int value.
    tallies = Counter(raw) if width == 1 else Counter(raw[i : i + width] for i in range(0, len(raw), width))
    num_bits = bits.num_bits
    mask = (1 << num_bits) - 1
    counts: dict[str, int] = {}
    for shot, n in tallies.items():
        value = (shot if isinstance(shot, int) else int.from_bytes(shot, "big")) & mask
        key = format(value, f"0{num_bits}b")
        counts[key] = counts.get(key, 0) + n
    return counts


def _aer_max_qubits() -> int:
    sdk_imports.ensure("aer")
    from qiskit_aer import AerSimulator

    return int(AerSimulator().configuration().n_qubits)
