"""Long-lived threads for blocking SDK calls (Qiskit parsing, Aer simulation).

Qiskit 2.6's native extension uses its own allocator (mimalloc). Seen here: after the event
loop's short-lived worker threads came and went, the first allocation on a fresh thread
crashed the process (SIGSEGV in `mi_thread_init`, called from `qiskit.qasm2`). Running every
Qiskit call on a fixed pool of threads that live as long as the process avoids that churn.
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
