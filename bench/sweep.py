"""A sweep: one job of 1,000 different 5-qubit, 100-shot circuits, submit → every count back.

Ours, over stdio (`qpu-gateway serve`): submit_job with the 1,000 programs, wait_for_job until
it ends, then read the job's resource, which holds every count (get_job summarises results
beyond 20 circuits). Clock from the submit to the counts in hand, as an agent sees it.

Baseline: the same 1,000 circuits run directly on Aer in this process, in one batched
SamplerV2 call, clock from the call to the counts in hand. The circuits are parsed before the
clock starts, as a program holding QuantumCircuit objects would have them; the parse time is
recorded beside it (extra `baseline_parse_s`) because the gateway, which receives text, has to
parse. Each repetition uses a fresh set of circuits, shared by its baseline and ours.
"""

from __future__ import annotations

import time
from typing import Any

from bench import env, policies, tools
from bench.circuits import SHOTS, circuits
from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary

NAMES = ("sweep",)


def _aer_batched(sources: list[str]) -> tuple[float, float]:
    """(parse seconds, run seconds) for the circuits on Aer in one SamplerV2 call."""
    from qiskit import qasm2
    from qiskit_aer.primitives import SamplerV2

    began = time.perf_counter()
    parsed = [qasm2.loads(source) for source in sources]
    parse_s = time.perf_counter() - began
    began = time.perf_counter()
    results = SamplerV2().run([(c,) for c in parsed], shots=SHOTS).result()
    counts = [pub.data.c.get_counts() for pub in results]
    run_s = time.perf_counter() - began
    if len(counts) != len(sources) or any(sum(c.values()) != SHOTS for c in counts):
        raise RuntimeError("Aer returned the wrong number of counts")
    return parse_s, run_s


async def _ours(client: Any, sources: list[str]) -> float:
    began = time.perf_counter()
    job_id = await tools.submit(client, sources)
    await tools.await_job(client, job_id)
    counts = await tools.full_counts(client, job_id)
    elapsed = time.perf_counter() - began
    if len(counts) != len(sources) or any(sum(c["c"].values()) != SHOTS for c in counts):
        raise tools.UnexpectedAnswer(f"the sweep's resource holds {len(counts)} results, not {len(sources)}")
    return elapsed


async def run(ctx: Context, names: set[str]) -> list[Row]:
    size, repeats = ctx.pick(1000, 100), ctx.pick(3, 2)
    files = await env.gateway_files(ctx.scratch("sweep"), policies.admitting())
    base: list[float] = []
    ours: list[float] = []
    parse: list[float] = []
    async with env.stdio_client(env.gateway_params(files)) as client:
        warm = circuits(10, start=10**6)
        await _ours(client, warm)  # loads Aer in the server
        # Aer runs on this thread, with the event loop blocked while the server sits idle: Qiskit's
        # allocator has crashed on short-lived threads (see adapters/sdk_thread.py).
        _aer_batched(warm)
        for i in range(repeats):
            sources = circuits(size, start=i * size, seed=13)
            parse_s, run_s = _aer_batched(sources)
            parse.append(parse_s)
            base.append(size / run_s)
            ours.append(size / await _ours(client, sources))
            ctx.log(f"sweep {i + 1}/{repeats}: ours {ours[-1]:.0f} circuits/s, Aer batched {base[-1]:.0f} circuits/s")
    return [
        Row(
            f"sweep of {size:,} circuits, submit → all counts",
            "circuits/s",
            Summary.of(base),
            Summary.of(ours),
            Target(">=", 0.5),
            "the same circuits on Aer, one batched call",
            notes=[f"{repeats} repetitions; 5 qubits, {SHOTS} shots; over stdio, counts read from the job resource"],
            extra={
                "baseline_parse_s": parse,
                "baseline_with_parse_circuits_per_s": [size / (p + size / b) for p, b in zip(parse, base, strict=True)],
            },
        )
    ]
