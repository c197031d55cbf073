"""Long-lived threads for blocking SDK calls (Qiskit parsing, Aer simulation, provider requests).

Blocking SDK calls never run on the event loop, and not on anyio's worker threads either, which
exit when idle: Qiskit 2.6 crashes the process (SIGSEGV) once a thread that imported it has
exited and a new thread uses it (first seen as a crash in `mi_thread_init`, from `qiskit.qasm2`,
after the event loop's short-lived threads had come and gone). These threads live as long as the
process. The imports themselves run on `sdk_imports`' own thread, one at a time; these threads
only use what it imported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="qpu-sdk")
    return _pool


async def run_sync(func: Callable[[], T]) -> T:
    """Run `func` on the SDK thread pool without blocking the event loop.

    If the caller is cancelled the call is abandoned: it finishes in its thread, unobserved.
    """
    return await asyncio.wrap_future(_executor().submit(func))


def submit(func: Callable[[], T]) -> Future[T]:
    """Start `func` on the SDK thread pool and return its future, for work nobody awaits directly."""
    return _executor().submit(func)
