"""Provider SDKs imported once per process, one at a time, on a thread that never exits.

Two facts about Qiskit 2.6, each reproduced in a fresh interpreter (tests/test_sdk_imports.py):

- Its first import is not safe from two threads at once. Its modules import each other in
  circles; Python's per-module import locks see two threads entering such a circle from
  different ends as a deadlock and hand one of them the half-built module ("cannot import name
  'ParameterExpression' from partially initialized module 'qiskit.circuit...'"). A process whose
  worker ran a reclaimed Aer job while a submit listed Aer's backend failed like that 10 runs
  out of 10, the job charged a permanent error.
- If the thread that imported it exits, the next thread that starts and uses Qiskit crashes the
  process (SIGSEGV, 3 runs out of 3: import in a thread, join it, parse in a new thread; the same
  with the import on a thread that stays alive never crashed). Aer runs each simulation on a new
  thread of its own, so this is not a corner case.

So every function of ours that uses an SDK calls `ensure(name)` first. The first call has the
SDK's modules imported by one long-lived thread kept for that (the caller waits), so imports are
serialised and their thread outlives every use; every later call is a set lookup. SDKs stay
lazy: a process that never runs a circuit never imports Qiskit. Each name imports everything
our paths use of it, so no first import is left for some other thread to make later (a test
checks that running our paths after `ensure` imports no module at all).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

# The modules behind each name, imported in this order. Names listed in NEEDS are loaded first.
MODULES: dict[str, tuple[str, ...]] = {
    # Parsing, fingerprinting (the standard gate names) and OpenQASM 3 export.
    "qiskit": (
        "numpy",
        "qiskit",
        "qiskit.circuit.library",
        "qiskit.qasm2",
        "qiskit.qasm3",
        "qiskit_qasm3_import",
    ),
    # `transpile` and the preset pass managers; their plugins are loaded by `_transpiler_plugins`.
    "transpiler": ("qiskit.transpiler", "qiskit.transpiler.preset_passmanagers"),
    "aer": ("qiskit_aer", "qiskit_aer.primitives"),
    "ibm": ("qiskit_ibm_runtime", "qiskit_ibm_runtime.fake_provider"),
    "braket": (
        "boto3",
        "botocore.config",
        "botocore.exceptions",
        "braket.aws",
        "braket.devices",
        "braket.ir.openqasm",
        "braket.schema_common",
        "braket.task_result",
        "braket.tasks",
    ),
    "azure": (
        "azure.core.exceptions",
        "azure.identity",
        "azure.quantum",
        "azure.quantum.storage",
        "azure.quantum.target",
        "azure.storage.blob",
    ),
}
NEEDS: dict[str, tuple[str, ...]] = {
    "transpiler": ("qiskit",),
    "aer": ("qiskit",),
    "ibm": ("qiskit", "transpiler", "aer"),
    "braket": ("qiskit",),
    "azure": ("qiskit",),
}

_loaded: set[str] = set()
# One thread does every import, so imports never run two at once, and it never exits (an idle
# executor thread waits for work until the process ends).
_IMPORTER = "qpu-sdk-import"
_importer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_IMPORTER)


def ensure(*names: str) -> None:
    """Import the SDKs `names` stand for unless this process already has; safe from any thread.

    An import that fails leaves the name unloaded and raises (an `ImportError`: a failure of this
    process, not of the job that needed it); the next call tries again.
    """
    for name in names:
        if name in _loaded:
            continue
        if threading.current_thread().name.startswith(_IMPORTER):
            _load(name)  # already on the importer thread: waiting for it would wait forever
        else:
            _importer.submit(_load, name).result()


def _load(name: str) -> None:
    """On the importer thread: import `name`'s NEEDS, then its modules."""
    if name in _loaded:
        return
    for need in NEEDS.get(name, ()):
        _load(need)
    started = time.perf_counter()
    for module in MODULES[name]:
        importlib.import_module(module)
    if name == "transpiler":
        _transpiler_plugins()
    _loaded.add(name)
    log.debug("imported %s in %.2f s", name, time.perf_counter() - started)


def _transpiler_plugins() -> None:
    """Import every installed transpiler plugin now, as the first transpile would (qiskit-ibm-runtime
    registers some, so the first `transpile` of any circuit imports all of it, 1.4 s here)."""
    from qiskit.transpiler.passes.synthesis.plugin import HighLevelSynthesisPluginManager, UnitarySynthesisPluginManager
    from qiskit.transpiler.preset_passmanagers.plugin import PassManagerStagePluginManager

    PassManagerStagePluginManager()
    UnitarySynthesisPluginManager()
    HighLevelSynthesisPluginManager()
