"""Circuit intake: screen OpenQASM text, parse it with Qiskit, and measure what policy needs.

Cheap text checks (size, header, includes, declared register sizes) run before the parser,
so a hostile program is refused before anything heavy happens.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpu_gateway.adapters import qasm, sdk_imports
from qpu_gateway.errors import InvalidCircuit, LimitExceeded

if TYPE_CHECKING:
    from qiskit import QuantumCircuit

# Operations after unfolding every custom gate: far above any real job, far below what would
# exhaust memory when a simulator unfolds it.
MAX_EXPANDED_OPERATIONS = 1_000_000
_QUBIT_CAP = "at most {} are allowed here (the lower of the policy's max_qubits and the backend's qubits)."
_NOT_GATES = frozenset({"measure", "barrier", "reset", "delay", "store"})


@dataclass(frozen=True, slots=True)
class CircuitFacts:
    version: int
    qubits: int
    clbits: int
    depth: int
    one_qubit_gates: int
    two_qubit_gates: int
    measurements: int
    registers: tuple[str, ...]
    fingerprint: str


def inspect_sources(sources: list[str], *, max_qubits: int) -> list[CircuitFacts]:
    """Facts for each source, in order; raises a coded error naming the first bad circuit.

    Blocking (the parser runs here): call it from a worker thread.
    """
    return inspect_and_load(sources, max_qubits=max_qubits)[0]


def inspect_and_load(sources: list[str], *, max_qubits: int) -> tuple[list[CircuitFacts], list[QuantumCircuit]]:
    """`inspect_sources`, and the parsed circuits too (for a simulator in this process to run as they are)."""
    facts, parsed = [], []
    for index, source in enumerate(sources):
        where = f"circuit {index}: " if len(sources) > 1 else ""
        fact, circuit = _inspect(source, max_qubits=max_qubits, where=where)
        facts.append(fact)
        parsed.append(circuit)
    return facts, parsed


def _inspect(source: str, *, max_qubits: int, where: str) -> tuple[CircuitFacts, QuantumCircuit]:
    if len(source.encode("utf-8", errors="replace")) > qasm.MAX_SOURCE_BYTES:
        raise LimitExceeded(f"{where}the program is larger than {qasm.MAX_SOURCE_BYTES // 1024} KB.")
    try:
        version, code = qasm.screen(source)
        declared = qasm.declared_qubits(code)
        if declared > max_qubits:
            raise LimitExceeded(f"{where}the program declares {declared} qubits; {_QUBIT_CAP.format(max_qubits)}")
        circuit = qasm.load(source, version=version)
    except qasm.CircuitSourceError as exc:
        raise InvalidCircuit(f"{where}{exc}") from None
    if circuit.num_qubits > max_qubits:  # a backstop: the text screen should have caught it
        raise LimitExceeded(f"{where}the circuit uses {circuit.num_qubits} qubits; {_QUBIT_CAP.format(max_qubits)}")
    tally: Counter[str] = Counter()
    digest, expanded = _Walker().walk(circuit, tally)
    measurements = tally["measure"]
    if measurements == 0:
        raise InvalidCircuit(f"{where}the circuit measures nothing, so it would return no counts. Add measure.")
    if expanded > MAX_EXPANDED_OPERATIONS:
        raise LimitExceeded(
            f"{where}the circuit expands to {expanded} operations once its gate definitions are unfolded; "
            f"at most {MAX_EXPANDED_OPERATIONS} are accepted."
        )
    facts = CircuitFacts(
        version=version,
        qubits=circuit.num_qubits,
        clbits=circuit.num_clbits,
        # A custom gate counts as one layer in circuit.depth(); the unfolded operations spread over
        # the qubits give a lower bound on the real depth, so max_depth cannot be dodged by nesting.
        depth=max(circuit.depth(), math.ceil(expanded / max(circuit.num_qubits, 1))),
        one_qubit_gates=tally["one_qubit"],
        two_qubit_gates=tally["two_qubit"],
        measurements=measurements,
        registers=tuple(creg.name for creg in circuit.cregs),
        fingerprint=digest,
    )
    return facts, circuit


def fingerprint(circuit: QuantumCircuit) -> str:
    """sha256 of the parsed circuit's canonical form: the same program hashes the same however written.

    Whitespace, comments and gate spelling in the source do not change it; register layout,
    operations, their parameters and their wiring do, and so do custom gates' bodies.
    """
    return _Walker().walk(circuit)[0]


class _Walker:
    """One pass over a circuit and its custom gates' bodies, each distinct body visited once.

    Gates defined in terms of other gates can multiply (each calling the previous one twice
    doubles the work per level), so bodies are memoised by gate, and the expanded operation
    count is computed from the memo instead of by expanding.
    """

    def __init__(self) -> None:
        self.standard = _standard_names()
        self.memo: dict[tuple[object, ...], tuple[str, int]] = {}

    def walk(self, circuit: QuantumCircuit, tally: Counter[str] | None = None) -> tuple[str, int]:
        """(sha256 of the canonical form, operations after expanding every custom gate).

        With `tally`, the circuit's own operations are counted into it in the same pass:
        `measure`, and gates (not measure, barrier, reset or delay) on `one_qubit` and `two_qubit`.
        """
        digest = hashlib.sha256()
        digest.update(f"q{circuit.num_qubits};".encode())
        for creg in circuit.cregs:
            digest.update(f"c {creg.name} {creg.size};".encode())
        expanded = 0
        # Bit positions looked up once per circuit (find_bit per operand was most of the walk).
        qubit_index = {bit: str(i) for i, bit in enumerate(circuit.qubits)}
        clbit_index = {bit: str(i) for i, bit in enumerate(circuit.clbits)}
        for inst in circuit.data:
            qubits = ",".join(qubit_index[q] for q in inst.qubits)
            clbits = ",".join(clbit_index[c] for c in inst.clbits)
            params = ",".join(_param(p) for p in inst.operation.params)
            digest.update(f"{inst.operation.name}({params}) {qubits} -> {clbits};".encode())
            if tally is not None:
                name = inst.operation.name
                if name == "measure":
                    tally["measure"] += 1
                elif name not in _NOT_GATES and len(inst.qubits) in (1, 2):
                    tally["one_qubit" if len(inst.qubits) == 1 else "two_qubit"] += 1
            body, count = self._body(inst.operation, params)
            if body:
                digest.update(b"{" + body.encode() + b"}")
            expanded += count
        return digest.hexdigest(), expanded

    def _body(self, operation: Any, params: str) -> tuple[str, int]:
        if operation.name in self.standard:
            return "", 1
        key = (operation.name, params, operation.num_qubits, operation.num_clbits)
        if key not in self.memo:
            definition = getattr(operation, "definition", None)
            self.memo[key] = ("", 1) if definition is None else self.walk(definition)
        return self.memo[key]


@functools.cache
def _standard_names() -> frozenset[str]:
    """Operations taken as they are (not unfolded): Qiskit's standard gates and the non-gates."""
    sdk_imports.ensure("qiskit")
    from qiskit.circuit.library import get_standard_gate_name_mapping

    return frozenset(get_standard_gate_name_mapping()) | {"measure", "barrier", "reset", "delay"}


def _param(value: object) -> str:
    try:
        return repr(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def combined_fingerprint(facts: list[CircuitFacts]) -> str:
    """One fingerprint for a job: the circuit's, or a hash over a sweep's in order."""
    if len(facts) == 1:
        return facts[0].fingerprint
    return hashlib.sha256("".join(f.fingerprint for f in facts).encode()).hexdigest()
