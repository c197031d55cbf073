"""Circuit intake: OpenQASM text becomes the facts policy needs, and hostile text is refused early."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import qiskit.qasm2

from qpu_gateway.adapters.qasm import MAX_SOURCE_BYTES
from qpu_gateway.errors import InvalidCircuit, LimitExceeded
from qpu_gateway.jobs.circuits import CircuitFacts, combined_fingerprint, inspect_sources

from .support import BELL2, BELL3

INCLUDE_REFUSAL = "Only the standard library may be included"

# A gate library an attacker would like the gateway to read from the server's disk.
EVIL_LIBRARY = "gate evil a { x a; }\n"


def inspect_one(source: str, *, max_qubits: int = 24) -> CircuitFacts:
    [facts] = inspect_sources([source], max_qubits=max_qubits)
    return facts


def program_v2(include: str, body: str = "evil q[0];") -> str:
    return f'OPENQASM 2.0;\ninclude "qelib1.inc";\n{include}\nqreg q[1];\ncreg c[1];\n{body}\nmeasure q -> c;\n'


def program_v3(include: str, body: str = "evil q[0];") -> str:
    return f'OPENQASM 3.0;\ninclude "stdgates.inc";\n{include}\nqubit[1] q;\nbit[1] c;\n{body}\nc = measure q;\n'


@pytest.fixture
def evil_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real, readable gate library in the working directory, reachable by absolute and relative name."""
    path = tmp_path / "evil.inc"
    path.write_text(EVIL_LIBRARY)
    monkeypatch.chdir(tmp_path)
    return path


# -- facts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "version"), [(BELL2, 2), (BELL3, 3)], ids=["qasm2", "qasm3"])
def test_bell_circuit_parses_to_its_facts_in_both_versions(source: str, version: int) -> None:
    facts = inspect_one(source)

    assert facts.version == version
    assert (facts.qubits, facts.clbits, facts.depth) == (2, 2, 3)
    assert facts.two_qubit_gates == 1
    assert facts.measurements == 2
    assert facts.registers == ("c",)


def test_several_registers_are_counted_and_named_in_order() -> None:
    source = (
        "OPENQASM 2.0;\n"
        'include "qelib1.inc";\n'
        "qreg a[2];\n"
        "qreg b[3];\n"
        "creg m[2];\n"
        "creg n[3];\n"
        "h a[0];\n"
        "cx a[0], b[0];\n"
        "cx a[1], b[1];\n"
        "cz b[1], b[2];\n"
        "ccx a[0], a[1], b[2];\n"
        "measure a -> m;\n"
        "measure b -> n;\n"
    )

    facts = inspect_one(source)

    assert (facts.qubits, facts.clbits) == (5, 5)
    assert facts.registers == ("m", "n")
    assert facts.two_qubit_gates == 3  # the three-qubit ccx is not a two-qubit gate
    assert facts.measurements == 5


def test_barriers_and_measurements_are_not_counted_as_two_qubit_gates() -> None:
    source = (
        "OPENQASM 3.0;\n"
        'include "stdgates.inc";\n'
        "qubit[3] q;\n"
        "bit[3] c;\n"
        "bit[1] flag;\n"
        "h q[0];\n"
        "cx q[0], q[1];\n"
        "cx q[1], q[2];\n"
        "barrier q[0], q[1];\n"
        "c = measure q;\n"
    )

    facts = inspect_one(source)

    assert (facts.qubits, facts.clbits, facts.depth) == (3, 4, 4)
    assert facts.two_qubit_gates == 2
    assert facts.registers == ("c", "flag")


def test_a_sweep_is_inspected_in_order_and_an_error_names_the_bad_circuit() -> None:
    facts = inspect_sources([BELL2, BELL3], max_qubits=24)
    assert [f.version for f in facts] == [2, 3]

    with pytest.raises(InvalidCircuit, match=r"^circuit 1: "):
        inspect_sources([BELL2, "not a program"], max_qubits=24)


# -- includes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_program",
    [
        lambda path: program_v2(f'include "{path}";'),
        lambda path: program_v2('include "evil.inc";'),
        lambda path: program_v3(f'include "{path}";'),
        lambda path: program_v3('include "evil.inc";'),
    ],
    ids=["v2-absolute", "v2-relative", "v3-absolute", "v3-relative"],
)
def test_including_a_real_file_from_disk_is_refused_before_any_parser_runs(make_program, evil_file: Path) -> None:
    program = make_program(evil_file)

    with pytest.raises(InvalidCircuit) as refused:
        inspect_one(program)

    # The include screen's own message: the text check refused it, so no parser (and no file
    # open) ever happened. A parser that had opened the file would have accepted `evil`.
    assert INCLUDE_REFUSAL in refused.value.message
    assert evil_file.read_text() == EVIL_LIBRARY


def test_the_evil_library_would_have_worked_had_a_parser_been_allowed_to_read_it(evil_file: Path) -> None:
    """Control for the refusal tests: the file is real and a permissive parser does use it."""
    circuit = qiskit.qasm2.loads(program_v2('include "evil.inc";'), include_path=(str(evil_file.parent),))

    assert [inst.operation.name for inst in circuit.data] == ["evil", "measure"]


@pytest.mark.parametrize(
    "include",
    [
        'include /*x*/ "evil.inc";',
        'include "qelib1.inc";\ninclude "evil.inc";',
        'include\n"evil.inc"\n;',
        "include 'evil.inc';",
        'include "qelib1.inc" ; include "../evil.inc";',
        'include "stdgates.inc";',  # the other version's library is not this version's
    ],
    ids=[
        "comment-inside",
        "second-include",
        "split-over-lines",
        "single-quotes",
        "parent-dir",
        "wrong-library",
    ],
)
def test_obfuscated_includes_are_refused(include: str, evil_file: Path) -> None:
    with pytest.raises(InvalidCircuit, match=INCLUDE_REFUSAL):
        inspect_one(program_v2(include))


@pytest.mark.parametrize(
    ("make_program", "commented"),
    [
        (program_v2, '// include "evil.inc";'),
        (program_v3, '// include "evil.inc";'),
        (program_v3, '/* include "evil.inc"; */'),
        (program_v3, '/*\ninclude "evil.inc";\n*/'),
    ],
    ids=["v2-line-comment", "v3-line-comment", "v3-block-comment", "v3-multi-line-block"],
)
def test_a_commented_out_include_is_ignored(make_program, commented: str, evil_file: Path) -> None:
    facts = inspect_one(make_program(commented, body="x q[0];"))

    assert facts.qubits == 1 and facts.measurements == 1


@pytest.mark.parametrize("make_program", [program_v2, program_v3], ids=["qasm2", "qasm3"])
def test_an_include_hidden_between_line_comments_that_look_like_a_block_comment_is_refused(
    make_program, evil_file: Path
) -> None:
    program = make_program(f'// /*\ninclude "{evil_file}";\n// */')

    with pytest.raises(InvalidCircuit) as refused:
        inspect_one(program)

    assert INCLUDE_REFUSAL in refused.value.message


# -- header and version -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source",
    ["qreg q[1];\ncreg c[1];\nmeasure q -> c;\n", 'include "qelib1.inc";\nOPENQASM 2.0;\n', ""],
    ids=["no-header", "header-not-first", "empty"],
)
def test_a_program_without_an_openqasm_header_is_refused(source: str) -> None:
    with pytest.raises(InvalidCircuit, match=re.escape("must start with 'OPENQASM 2.0;' or 'OPENQASM 3.0;'")):
        inspect_one(source)


def test_comments_before_the_header_are_allowed() -> None:
    assert inspect_one("// a Bell pair\n" + BELL2).version == 2
    assert inspect_one("// a Bell pair\n/* made by an agent */\n" + BELL3).version == 3


def test_openqasm_4_is_refused_as_unsupported() -> None:
    with pytest.raises(InvalidCircuit, match="OpenQASM 4 is not supported"):
        inspect_one("OPENQASM 4.0;\nqubit[1] q;\nbit[1] c;\nc = measure q;\n")


# -- size limits ------------------------------------------------------------------------------------


def test_a_source_over_100_kb_is_refused_as_a_limit() -> None:
    padding = "// " + "x" * 80 + "\n"
    source = BELL2 + padding * (MAX_SOURCE_BYTES // len(padding) + 1)
    assert len(source.encode()) > 100 * 1024

    with pytest.raises(LimitExceeded, match="larger than 100 KB"):
        inspect_one(source)


def test_a_source_just_under_the_limit_is_accepted() -> None:
    padding = "// " + "x" * 80 + "\n"
    source = BELL2 + padding * ((MAX_SOURCE_BYTES - len(BELL2)) // len(padding))
    assert len(source.encode()) <= MAX_SOURCE_BYTES

    assert inspect_one(source).qubits == 2


@pytest.mark.parametrize(
    "declaration",
    [
        'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[100000000];',
        'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[999999999999] q;',
    ],
    ids=["qasm2-qreg", "qasm3-qubit"],
)
def test_a_huge_declared_register_is_refused_quickly_without_parsing(declaration: str) -> None:
    # Everything after the declaration is garbage: had a parser run, it would have said so.
    source = declaration + "\nthis is @@@ not a program ;;;\n"
    started = time.perf_counter()

    with pytest.raises(LimitExceeded, match="at most 24"):
        inspect_one(source, max_qubits=24)

    assert time.perf_counter() - started < 1.0


def test_declared_qubits_over_the_cap_are_refused_even_when_each_register_is_small() -> None:
    source = 'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[3] a;\nqubit[3] b;\nqubit c;\nbit d;\nd = measure c;\n'

    with pytest.raises(LimitExceeded, match="declares 7 qubits"):
        inspect_one(source, max_qubits=6)

    assert inspect_one(source, max_qubits=7).qubits == 7


@pytest.mark.parametrize("size", ["1_000", "0x3e8", "2 * 500"], ids=["underscores", "hex", "expression"])
def test_a_register_size_written_other_than_as_plain_digits_is_refused_before_parsing(size: str) -> None:
    source = f'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[{size}] q;\nbit[1] c;\nc[0] = measure q[0];\n'

    with pytest.raises(InvalidCircuit, match="plain decimal"):
        inspect_one(source, max_qubits=24)


def test_a_register_hidden_between_line_comments_that_look_like_a_block_comment_is_still_capped() -> None:
    source = program_v2("// /*\nqreg big[1000];\n// */", body="x q[0];")

    with pytest.raises(LimitExceeded):
        inspect_one(source, max_qubits=24)


# -- what the circuit does --------------------------------------------------------------------------


def test_a_circuit_that_measures_nothing_is_refused() -> None:
    source = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0], q[1];\n'

    with pytest.raises(InvalidCircuit, match="measures nothing"):
        inspect_one(source)


@pytest.mark.parametrize(
    "source",
    [
        'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[1];\ncreg c[1];\nfoo q[0];\nmeasure q -> c;\n',
        'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2]\n',
        "OPENQASM 2.0;\n@@@ ;;; }}}\n",
        'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[1] q;\nbit[1] c;\nfoo q[0];\nc = measure q;\n',
        'OPENQASM 3.0;\ninclude "stdgates.inc";\nqubit[2] q;\nh q[0]\nc = measure q;\n',
        'OPENQASM 3.0;\ninclude "stdgates.inc";\ninclude "stdgates.inc";\nqubit q;\nbit c;\nc = measure q;\n',
    ],
    ids=["v2-unknown-gate", "v2-eof", "v2-garbage", "v3-unknown-gate", "v3-syntax", "v3-double-include"],
)
def test_a_parse_error_names_no_filesystem_path(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(InvalidCircuit) as refused:
        inspect_one(source)

    message = refused.value.message
    assert message.startswith(("OpenQASM 2 parse error: ", "OpenQASM 3 parse error: "))
    assert "/" not in message and "\\" not in message
    assert str(tmp_path) not in message and "site-packages" not in message


# -- fingerprints -----------------------------------------------------------------------------------

BELL2_REWRITTEN = """// the same Bell pair, written by another hand
OPENQASM 2.0;
include "qelib1.inc";   // standard gates
qreg q[2];  creg c[2];
h   q[0];
  cx q[0],q[1];   // entangle

measure q -> c;  // read out
"""

BELL3_REWRITTEN = """/* the same Bell pair,
   written by another hand */
OPENQASM 3.0;
include "stdgates.inc";
qubit[2] q; bit[2] c;
h q[0];  /* entangle: */ cx q[0],
   q[1];
c = measure q;  // read out
"""

ROTATION = (
    'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\n'
    "rz({angle}) q[0];\n{gate} q[0], q[1];\nmeasure q -> c;\n"
)


@pytest.mark.parametrize(
    ("original", "rewritten"), [(BELL2, BELL2_REWRITTEN), (BELL3, BELL3_REWRITTEN)], ids=["qasm2", "qasm3"]
)
def test_the_same_circuit_written_differently_has_the_same_fingerprint(original: str, rewritten: str) -> None:
    assert inspect_one(rewritten).fingerprint == inspect_one(original).fingerprint


def test_an_angle_spelled_two_ways_has_the_same_fingerprint() -> None:
    by_pi = inspect_one(ROTATION.format(angle="pi/2", gate="cx"))
    by_number = inspect_one(ROTATION.format(angle="1.5707963267948966", gate="cx"))

    assert by_pi.fingerprint == by_number.fingerprint


def test_changing_a_gate_or_an_angle_changes_the_fingerprint() -> None:
    base = inspect_one(ROTATION.format(angle="0.5", gate="cx")).fingerprint
    other_angle = inspect_one(ROTATION.format(angle="0.25", gate="cx")).fingerprint
    other_gate = inspect_one(ROTATION.format(angle="0.5", gate="cz")).fingerprint
    other_wiring = inspect_one(ROTATION.format(angle="0.5", gate="cx").replace("cx q[0], q[1]", "cx q[1], q[0]"))

    assert len({base, other_angle, other_gate, other_wiring.fingerprint}) == 4


def test_circuits_whose_custom_gate_bodies_differ_have_different_fingerprints() -> None:
    source = (
        'OPENQASM 2.0;\ninclude "qelib1.inc";\ngate foo a {{ {body} }}\n'
        "qreg q[1];\ncreg c[1];\nfoo q[0];\nmeasure q -> c;\n"
    )

    hadamard = inspect_one(source.format(body="h a;"))
    flip = inspect_one(source.format(body="x a;"))

    assert hadamard.fingerprint != flip.fingerprint


def test_the_combined_fingerprint_of_one_circuit_is_that_circuits_fingerprint() -> None:
    facts = inspect_sources([BELL2], max_qubits=24)

    assert combined_fingerprint(facts) == facts[0].fingerprint


def test_the_combined_fingerprint_of_a_sweep_depends_on_order() -> None:
    first = inspect_one(ROTATION.format(angle="0.1", gate="cx"))
    second = inspect_one(ROTATION.format(angle="0.2", gate="cx"))

    forward = combined_fingerprint([first, second])

    assert forward == combined_fingerprint([first, second])
    assert forward != combined_fingerprint([second, first])
    assert forward not in {first.fingerprint, second.fingerprint}
