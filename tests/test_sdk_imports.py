"""Provider SDKs imported for the first time from several threads at once: every thread gets a whole SDK.

Qiskit's first import in a process is not safe from two threads at once. Each test here runs a
fresh interpreter (the race exists only before the first import), starts the threads together at
a barrier, and has each call the gateway's own code for one path (no SDK is imported by hand).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .support import BELL2, BELL3

# The script run in each fresh interpreter: `PATHS` maps a name to a call into our code; all of
# them start at once, and the script prints the failures (type and first line) as one line.
RACE = """
import sys, threading, traceback
BELL2, BELL3 = {bell2!r}, {bell3!r}

def parser():
    from qpu_gateway.jobs.circuits import inspect_and_load
    facts, _ = inspect_and_load([BELL2, BELL3], max_qubits=20)
    assert facts[0].fingerprint == facts[1].fingerprint

def aer():
    import anyio
    from qpu_gateway.adapters.aer import AerAdapter
    (backend,) = anyio.run(AerAdapter().backends)
    assert backend.qubits and backend.qubits >= 20

def aer_run():
    import anyio
    from qpu_gateway.adapters.aer import AerAdapter
    from qpu_gateway.adapters.base import JobSpec
    adapter = AerAdapter()
    async def run():
        ref = await adapter.submit(JobSpec("job_race", "aer/simulator", (BELL2,), 10))
        return await adapter.result(ref)
    assert sum(anyio.run(run).counts[0]["c"].values()) == 10

def ibm_fake():
    from qpu_gateway.adapters.ibm import IbmAdapter
    adapter = IbmAdapter()
    assert adapter._fake("fake_manila").num_qubits == 5
    assert len(adapter._fake_backends()) > 10

def braket_local():
    from qpu_gateway.adapters.braket import _local_properties, translate
    qubits, _, operations = _local_properties("braket_sv")
    assert "cnot" in translate(BELL2, operations, qubits).source

def azure_translate():
    from qpu_gateway.adapters.azure import to_ionq, to_openqasm2
    assert to_ionq(BELL2, "ionq.simulator", 10).data
    assert to_openqasm2(BELL3, "quantinuum.sim.h2-1e", 10).data

PATHS = {{name: globals()[name] for name in {paths!r}}}
barrier = threading.Barrier(len(PATHS))
failures = []

def run(name):
    barrier.wait()
    try:
        PATHS[name]()
    except BaseException as exc:
        failures.append(f"{{name}}: {{type(exc).__name__}}: {{str(exc).splitlines()[0] if str(exc) else ''}}")

threads = [threading.Thread(target=run, args=(name,)) for name in PATHS]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("FAILURES", failures)
"""


def run_race(paths: list[str]) -> list[str]:
    """Run `paths` at once in a fresh interpreter; the failures it printed."""
    script = RACE.format(bell2=BELL2, bell3=BELL3, paths=paths)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=False)
    line = next((text for text in out.stdout.splitlines() if text.startswith("FAILURES ")), None)
    assert line is not None, f"the race script did not finish: {out.returncode}\n{out.stderr[-3000:]}"
    return list(eval(line.removeprefix("FAILURES ")))  # a repr of a list of str, written by the script above


def test_the_parser_and_aer_importing_qiskit_for_the_first_time_in_two_threads_both_succeed() -> None:
    # Before the import gate this failed in 6 runs out of 10: "cannot import name 'ParameterExpression'
    # from partially initialized module", the parser's half reported as an invalid circuit.
    failures = [failure for _ in range(4) for failure in run_race(["parser", "aer"])]
    assert failures == []


def test_a_job_run_on_aer_while_a_submit_lists_aer_and_parses_its_circuit_succeeds() -> None:
    # The pattern seen in a real run: a reclaimed Bell job runs on Aer while the agent's first
    # submit lists Aer's backend and parses its circuit, each on an SDK thread. Before the gate
    # this failed 10 runs out of 10, the job's run as a PermanentError (charged to the job).
    failures = [failure for _ in range(3) for failure in run_race(["parser", "aer", "aer_run"])]
    assert failures == []


def test_qiskit_first_used_by_a_thread_that_exits_still_works_in_new_threads() -> None:
    # Without the importer thread this crashed the process (SIGSEGV) 3 runs out of 3: Qiskit
    # imported by a thread that then ended, and used by a new one (Aer starts one per simulation).
    script = textwrap.dedent(
        f"""
        import threading
        from qpu_gateway.jobs.circuits import inspect_and_load
        from qpu_gateway.adapters.aer import AerAdapter
        from qpu_gateway.adapters.base import JobSpec
        import anyio

        first = threading.Thread(target=lambda: inspect_and_load([{BELL2!r}], max_qubits=5))
        first.start()
        first.join()
        counts = []

        def run():
            adapter = AerAdapter()
            async def go():
                return await adapter.result(await adapter.submit(JobSpec("j", "aer/simulator", ({BELL2!r},), 10)))
            counts.append(sum(anyio.run(go).counts[0]["c"].values()))

        for _ in range(2):
            later = threading.Thread(target=run)
            later.start()
            later.join()
        print("COUNTS", counts)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "COUNTS [10, 10]" in out.stdout


@pytest.mark.slow
def test_every_provider_path_starting_at_once_gets_whole_sdks() -> None:
    paths = ["parser", "aer_run", "ibm_fake", "braket_local", "azure_translate"]
    assert run_race(paths) == []


def test_after_an_sdk_is_loaded_our_paths_import_nothing_more() -> None:
    # What `ensure` imports must be everything these paths use, or a later first use of a module
    # (a transpiler plugin, say) could still race another thread.
    script = textwrap.dedent(
        f"""
        import sys, anyio
        from qpu_gateway.adapters import sdk_imports
        sdk_imports.ensure("qiskit", "transpiler", "aer", "ibm", "braket", "azure")
        from qpu_gateway.adapters.aer import AerAdapter
        from qpu_gateway.adapters.azure import to_ionq, to_openqasm2, to_quil
        from qpu_gateway.adapters.base import JobSpec
        from qpu_gateway.adapters.braket import BraketAdapter, translate, _local_properties
        from qpu_gateway.adapters.ibm import IbmAdapter
        from qpu_gateway.jobs.circuits import inspect_and_load
        anyio.run(anyio.sleep, 0)  # anyio's own modules, imported when its first loop starts
        before = set(sys.modules)
        BELL2, BELL3 = {BELL2!r}, {BELL3!r}
        SWAPPY = BELL2.replace("cx q[0], q[1];", "cz q[0], q[1];\\nu3(0.1, 0.2, 0.3) q[1];")
        inspect_and_load([BELL2, BELL3, SWAPPY], max_qubits=20)

        async def main():
            aer = AerAdapter()
            await aer.backends()
            await aer.result(await aer.submit(JobSpec("a", "aer/simulator", (BELL2, BELL3), 10)))
            ibm = IbmAdapter()
            ibm._fake_backends()
            ref = await ibm.submit(JobSpec("i", "ibm/fake_manila", (SWAPPY,), 10))
            while (await ibm.status(ref)).state.value != "done":
                await anyio.sleep(0.05)
            await ibm.result(ref)
            braket = BraketAdapter(device_arns={{}})
            ref = await braket.submit(JobSpec("b", "braket/local_sv", (SWAPPY,), 10))
            await braket.result(ref)

        anyio.run(main)
        qubits, _, operations = _local_properties("braket_sv")
        translate(SWAPPY, frozenset({{"h", "cnot", "rz", "rx"}}), qubits)
        to_ionq(SWAPPY, "ionq.simulator", 10)
        to_openqasm2(BELL3, "quantinuum.sim.h2-1e", 10)
        to_quil(BELL2, "rigetti.sim.qvm", 10)
        print("NEW", sorted(m for m in set(sys.modules) - before if not m.startswith("qpu_gateway")))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NEW []" in out.stdout, out.stdout


SDK_PACKAGES = {
    "qiskit",
    "qiskit_aer",
    "qiskit_ibm_runtime",
    "qiskit_qasm3_import",
    "braket",
    "boto3",
    "botocore",
    "azure",
}
REPO = Path(__file__).resolve().parents[1]


def _sdk_imports_in(function: ast.AST) -> list[ast.stmt]:
    """The import statements of a provider SDK in `function`'s own body (not in functions nested in it)."""
    found: list[ast.stmt] = []
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            continue
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in SDK_PACKAGES for a in node.names):
            found.append(node)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in SDK_PACKAGES:
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _ensure_lines(function: ast.AST) -> list[int]:
    return [
        node.lineno
        for node in ast.walk(function)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "ensure"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "sdk_imports"
    ]


def test_every_function_that_imports_a_provider_sdk_goes_through_the_gate_first() -> None:
    unguarded = []
    for path in sorted([*(REPO / "adapters").glob("*.py"), *(REPO / "server").glob("*.py")]):
        if path.name == "sdk_imports.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            imports = _sdk_imports_in(function)
            if imports and not any(line < min(i.lineno for i in imports) for line in _ensure_lines(function)):
                unguarded.append(f"{path.name}:{function.lineno} {function.name}")
    assert unguarded == []
