"""The circuits the measures submit: distinct 5-qubit programs, so no measure leans on a repeat.

Each program has its own rotation angles, so every one has its own fingerprint: the loop guard
never sees a repeat, and nothing downstream can answer from a cache of an identical circuit
(repeated identical submissions are a loop, not a workload).
"""

from __future__ import annotations

import random

from qpu_gateway.ops.demo import BELL as DEMO_BELL

QUBITS = 5
SHOTS = 100

# The demo's Bell pair: one short, fixed program for the latency measures.
BELL = DEMO_BELL


def circuit(index: int, *, seed: int = 6) -> str:
    """The `index`-th 5-qubit program: a Hadamard layer, random rotations, a CX chain, measure all."""
    rng = random.Random(seed * 1_000_003 + index)
    lines = ["OPENQASM 2.0;", 'include "qelib1.inc";', f"qreg q[{QUBITS}];", f"creg c[{QUBITS}];"]
    lines += [f"h q[{i}];" for i in range(QUBITS)]
    lines += [f"rz({rng.uniform(0, 6.283):.6f}) q[{i}];" for i in range(QUBITS)]
    lines += [f"cx q[{i}], q[{i + 1}];" for i in range(QUBITS - 1)]
    lines += [f"rx({rng.uniform(0, 6.283):.6f}) q[{i}];" for i in range(QUBITS)]
    lines.append("measure q -> c;")
    return "\n".join(lines) + "\n"


def circuits(count: int, *, start: int = 0, seed: int = 6) -> list[str]:
    return [circuit(i, seed=seed) for i in range(start, start + count)]
