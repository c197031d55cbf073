"""Aer's micro-batches (adapters/aer.py) on the real simulator: jobs that arrive together share one
simulator call, yet each gets its own counts, shots and errors, and a cancelled one is left out."""

from __future__ import annotations

import anyio
import pytest

from qpu_gateway.adapters.aer import BACKEND_ID, AerAdapter
from qpu_gateway.adapters.base import JobSpec, PermanentError, ProviderRef, Result

from .support import BELL2, BELL3

pytestmark = pytest.mark.anyio

# 40 qubits with a non-Clifford gate: Aer refuses it for memory, failing any call it is part of.
UNPARSABLE = "OPENQASM 2.0;\nqreg q[1];\nnot_a_gate q[0];\n"
TOO_BIG = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[40];\ncreg c[40];\nh q;\nrx(0.3) q;\nmeasure q -> c;\n'


async def run_all(adapter: AerAdapter, specs: list[JobSpec]) -> dict[str, Result | Exception]:
    outcomes: dict[str, Result | Exception] = {}

    async def one(spec: JobSpec) -> None:
        try:
            ref = await adapter.submit(spec)
            outcomes[spec.job_id] = await adapter.result(ref)
        except PermanentError as exc:
            outcomes[spec.job_id] = exc

    async with anyio.create_task_group() as tg:
        for spec in specs:
            tg.start_soon(one, spec)
    return outcomes


async def test_jobs_submitted_together_share_simulator_calls_and_keep_their_own_shots_and_registers() -> None:
    adapter = AerAdapter()
    specs = [
        JobSpec(job_id=f"job_{n}", backend=BACKEND_ID, circuits=(BELL2,) * (1 + n % 3), shots=100 + n)
        for n in range(24)
    ]
    outcomes = await run_all(adapter, specs)

    assert adapter.executions == 24
    assert adapter.batches < 24, "jobs waiting while a simulation ran should have been run together"
    for spec in specs:
        result = outcomes[spec.job_id]
        assert isinstance(result, Result)
        assert len(result.counts) == len(spec.circuits)
        for counts in result.counts:
            assert set(counts) == {"c"}
            assert sum(counts["c"].values()) == spec.shots
            assert set(counts["c"]) <= {"00", "11"}  # a Bell pair, whichever job it shared a call with


async def test_a_circuit_that_breaks_the_shared_call_fails_only_its_own_job() -> None:
    adapter = AerAdapter()
    # Keep the simulator busy so the next three wait and run as one batch.
    first = JobSpec(job_id="warm", backend=BACKEND_ID, circuits=(BELL3,) * 200, shots=100)
    specs = [
        first,
        JobSpec(job_id="good_1", backend=BACKEND_ID, circuits=(BELL2,), shots=50),
        JobSpec(job_id="too_big", backend=BACKEND_ID, circuits=(TOO_BIG,), shots=50),
        JobSpec(job_id="unparsable", backend=BACKEND_ID, circuits=(UNPARSABLE,), shots=50),
        JobSpec(job_id="good_2", backend=BACKEND_ID, circuits=(BELL3,), shots=70),
    ]
    outcomes = await run_all(adapter, specs)

    assert isinstance(outcomes["too_big"], PermanentError)
    assert "memory" in str(outcomes["too_big"]).lower()
    assert isinstance(outcomes["unparsable"], PermanentError)
    for job_id, shots in (("good_1", 50), ("good_2", 70), ("warm", 100)):
        result = outcomes[job_id]
        assert isinstance(result, Result), f"{job_id}: {result}"
        assert all(sum(c["c"].values()) == shots for c in result.counts)


async def test_a_job_cancelled_before_its_batch_starts_is_never_simulated() -> None:
    adapter = AerAdapter()
    busy = JobSpec(job_id="busy", backend=BACKEND_ID, circuits=(BELL3,) * 400, shots=100)
    later = JobSpec(job_id="later", backend=BACKEND_ID, circuits=(BELL2,), shots=10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(adapter.submit, busy)
        await anyio.sleep(0.05)  # the busy job's batch is running
        with anyio.move_on_after(0.01):
            await adapter.submit(later)  # gives up while it waits for the next batch
    assert adapter.executions == 1
    assert (await adapter.status(ProviderRef("later"))).state.value == "unknown"
    # The adapter goes on serving after the withdrawal.
    ref = await adapter.submit(JobSpec(job_id="after", backend=BACKEND_ID, circuits=(BELL2,), shots=10))
    assert sum((await adapter.result(ref)).counts[0]["c"].values()) == 10


async def test_circuits_kept_from_admission_are_run_as_they_are_and_the_keep_is_bounded() -> None:
    from qpu_gateway.adapters import aer, qasm

    adapter = AerAdapter()
    bell = qasm.load(BELL2)
    # Kept circuits are used instead of parsing the job's sources again (these would not parse).
    adapter.keep_parsed("kept", [bell])
    ref = await adapter.submit(JobSpec(job_id="kept", backend=BACKEND_ID, circuits=(UNPARSABLE,), shots=40))
    assert sum((await adapter.result(ref)).counts[0]["c"].values()) == 40
    # Used once: a rerun of the same job id parses its sources.
    with pytest.raises(PermanentError):
        await adapter.submit(JobSpec(job_id="kept", backend=BACKEND_ID, circuits=(UNPARSABLE,), shots=40))
    # Forgotten, or pushed out by newer jobs past the bound: the sources are parsed.
    adapter.keep_parsed("forgotten", [bell])
    adapter.forget_parsed("forgotten")
    adapter.keep_parsed("oldest", [bell])
    adapter.keep_parsed("newest", [bell] * aer.KEPT_CIRCUITS)
    for job_id in ("forgotten", "oldest"):
        with pytest.raises(PermanentError):
            await adapter.submit(JobSpec(job_id=job_id, backend=BACKEND_ID, circuits=(UNPARSABLE,), shots=10))


WIDE = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[12];
creg low[3];
creg wide[12];
x q[0];
x q[11];
h q[5];
measure q[0] -> low[0];
measure q -> wide;
"""


async def test_counts_of_multi_byte_and_odd_sized_registers_read_as_bitstrings_most_significant_first() -> None:
    adapter = AerAdapter()
    outcomes = await run_all(adapter, [JobSpec(job_id="wide", backend=BACKEND_ID, circuits=(WIDE,), shots=400)])
    result = outcomes["wide"]
    assert isinstance(result, Result)
    (counts,) = result.counts
    assert counts["low"] == {"001": 400}
    assert set(counts["wide"]) == {"100000000001", "100000100001"}  # qubit 11 left, qubit 0 right
    assert sum(counts["wide"].values()) == 400


@pytest.mark.parametrize("num_bits", [1, 5, 8, 9, 13, 16, 17, 30])
def test_counts_are_what_qiskit_counts_give(num_bits: int) -> None:
    import numpy as np
    from qiskit.primitives.containers.bit_array import BitArray

    from qpu_gateway.adapters.aer import _counts

    shots = np.random.default_rng(num_bits).integers(0, 2, size=(1000, num_bits), dtype=np.uint8)
    bits = BitArray.from_bool_array(shots)
    assert list(_counts(bits).items()) == list(bits.get_counts().items())  # same keys, counts and order
