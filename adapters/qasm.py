"""OpenQASM 2 and 3 text to a Qiskit circuit, with includes restricted to the standard libraries.

The include screen runs on the text before any parser sees it, so no file is ever opened on
an agent's behalf, whatever the parser's own include search would do.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qpu_gateway.adapters import sdk_imports
from qpu_gateway.adapters.base import pass_internal

if TYPE_CHECKING:
    from qiskit import QuantumCircuit

MAX_SOURCE_BYTES = 100 * 1024

_STANDARD_INCLUDES = {2: {"qelib1.inc"}, 3: {"stdgates.inc"}}
# One left-to-right pass, so a comment marker inside another comment or a string cannot hide
# code from the screen. OpenQASM 2 has only line comments; 3 adds block comments.
_COMMENTS = {
    2: re.compile(r'//[^\n]*|"[^"\n]*"'),
    3: re.compile(r'//[^\n]*|/\*.*?(?:\*/|\Z)|"[^"\n]*"', re.DOTALL),
}
_HEADER = re.compile(r"\s*OPENQASM\s+(\d+)(?:\.(\d+))?\s*;")
_INCLUDE_WORD = re.compile(r"\binclude\b")
_INCLUDE_STMT = re.compile(r'\binclude\s*"([^"\n]*)"\s*;')
# Register declarations, to refuse a huge register before the parser allocates it. A size must
# be plain decimal digits: `0x3B9ACA00`, `1_000` or `2 * 500` could not be counted here.
_QREG_SIZE = re.compile(r"\bqreg\s+\w+\s*\[([^\]]*)\]")
_QUBIT_SIZE = re.compile(r"\bqubit\s*\[([^\]]*)\]")
_QUBIT_SINGLE = re.compile(r"\b(?:qubit|qreg)\s+[A-Za-z_]\w*\s*;")
_PHYSICAL_QUBIT = re.compile(r"\$(\d+)")
_PLAIN_SIZE = re.compile(r"^\s*(\d+)\s*$")
_HUGE = 10**9


class CircuitSourceError(ValueError):
    """The source is not a circuit we will run; the message says why and is safe to show."""


def strip_comments(source: str, version: int = 3) -> str:
    """The program with comments replaced by a space; string literals are kept as written."""

    def keep_strings(match: re.Match[str]) -> str:
        text = match.group(0)
        return text if text.startswith('"') else " "

    return _COMMENTS[version].sub(keep_strings, source)


def qasm_version(code: str) -> int:
    """2 or 3, from the `OPENQASM` header that must open the program (comments removed)."""
    match = _HEADER.match(code)
    if match is None:
        raise CircuitSourceError("The program must start with 'OPENQASM 2.0;' or 'OPENQASM 3.0;'.")
    major = int(match.group(1))
    if major not in (2, 3):
        raise CircuitSourceError(f"OpenQASM {major} is not supported; use OpenQASM 2.0 or 3.0.")
    return major


def check_includes(code: str, version: int) -> None:
    """Refuse any include other than the version's standard gate library."""
    allowed = _STANDARD_INCLUDES[version]
    statements = _INCLUDE_STMT.findall(code)
    if len(statements) != len(_INCLUDE_WORD.findall(code)) or any(name not in allowed for name in statements):
        only = ", ".join(sorted(allowed))
        raise CircuitSourceError(f"Only the standard library may be included in OpenQASM {version} ({only}).")


def declared_qubits(code: str) -> int:
    """Qubits the program declares (registers, or the highest physical qubit `$n` it names).

    Counted on the comment-free text before parsing; a size that is not plain decimal digits
    is refused, since it could hide any number.
    """

    def size(text: str) -> int:
        match = _PLAIN_SIZE.match(text)
        if match is None:
            raise CircuitSourceError(f"Register sizes must be plain decimal numbers; got [{text.strip()[:40]}].")
        digits = match.group(1)
        return int(digits) if len(digits) <= 9 else _HUGE

    registers = sum(size(t) for t in _QREG_SIZE.findall(code)) + sum(size(t) for t in _QUBIT_SIZE.findall(code))
    registers += len(_QUBIT_SINGLE.findall(code))
    physical = [int(d) + 1 if len(d) <= 9 else _HUGE for d in _PHYSICAL_QUBIT.findall(code)]
    return max([registers, *physical])


MAX_NESTING = 64
_OPERATOR_RUN = re.compile(rf"[-+~!]{{{MAX_NESTING + 1},}}")


def check_nesting(code: str) -> None:
    """Refuse brackets nested deeper than MAX_NESTING, or long runs of unary operators.

    Parsers recurse on both; a 100 KB program of nested parentheses costs seconds and hundreds
    of MB before it fails, so it is refused on the text.
    """
    depth = deepest = 0
    for char in code:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    if deepest > MAX_NESTING or _OPERATOR_RUN.search(code):
        raise CircuitSourceError(f"Expressions are nested deeper than {MAX_NESTING} levels; simplify the program.")


def screen(source: str) -> tuple[int, str]:
    """Size, header and include checks; returns the version and the comment-free text."""
    if len(source.encode("utf-8", errors="replace")) > MAX_SOURCE_BYTES:
        raise CircuitSourceError(f"The program is larger than {MAX_SOURCE_BYTES // 1024} KB.")
    version = qasm_version(strip_comments(source, 3))
    code = strip_comments(source, version)
    qasm_version(code)  # the header must still open the program under this version's comment rules
    check_includes(code, version)
    check_nesting(code)
    return version, code


def load(source: str, *, version: int | None = None) -> QuantumCircuit:
    """Parse OpenQASM into a circuit; parser errors become `CircuitSourceError`.

    `version` is for a caller that has already screened the source; otherwise it is screened here.
    """
    if version is None:
        version, _ = screen(source)
    return _parse(source, version)


def _parse(source: str, version: int) -> QuantumCircuit:
    sdk_imports.ensure("qiskit")
    try:
        if version == 2:
            import qiskit.qasm2

            return qiskit.qasm2.loads(source, include_path=())
        import qiskit.qasm3

        return qiskit.qasm3.loads(source)
    except CircuitSourceError:
        raise
    except Exception as exc:  # the parsers raise several unrelated types for bad programs
        pass_internal(exc)
        raise CircuitSourceError(f"OpenQASM {version} parse error: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().strip('"').splitlines()
    return text[0][:300] if text else type(exc).__name__
