"""Wall-clock time per phase inside our server: where a call's latency goes, awaits included.

cProfile sees only the event loop's own CPU time; a call mostly waits (for SQLite statements
and Qiskit, which run in threads, and for fsync). This tracer wraps chosen coroutine functions
of the gateway with a timer, from the outside and only in the bench's own runner
(`bench.gateway_server`, when QPU_BENCH_PHASES_DIR is set by `python -m bench --phases DIR`),
and on exit writes DIR/phases-<pid>.json. Phases nest: the middleware's time includes the
tool's, which includes admission's. A target the code no longer has is skipped and listed.

    python -m bench --only submit_job --phases /tmp/phases
    python -m bench.phases /tmp/phases/phases-*.json
"""

from __future__ import annotations

import argparse
import atexit
import functools
import importlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

PHASES_ENV = "QPU_BENCH_PHASES_DIR"

# (module, attribute path): coroutine functions on the way of a tool call and of a job.
TARGETS = (
    ("qpu_gateway.mcp.calls", "Calls.middleware"),
    ("qpu_gateway.mcp.calls", "Calls.tool"),
    ("qpu_gateway.mcp.calls", "Calls._rate_limit"),
    ("qpu_gateway.mcp.calls", "Calls._audit"),
    ("qpu_gateway.mcp.calls", "authenticate"),
    ("qpu_gateway.jobs.admission", "submit_job"),
    ("qpu_gateway.jobs.admission", "assess"),
    ("qpu_gateway.adapters.sdk_thread", "run_sync"),
    ("qpu_gateway.jobs.service", "get_job"),
    ("qpu_gateway.jobs.service", "wait_for_job"),
    ("qpu_gateway.jobs.service", "list_jobs"),
    ("qpu_gateway.jobs.ratelimit", "RateLimiter.enforce"),
    ("qpu_gateway.store.sqlite", "SqliteStore.admit"),
    ("qpu_gateway.store.sqlite", "SqliteStore.key_by_id"),
    ("qpu_gateway.store.sqlite", "SqliteStore.touch_key"),
    ("qpu_gateway.store.sqlite", "SqliteStore.append_audit"),
    ("qpu_gateway.store.sqlite", "SqliteStore.get_job"),
    ("qpu_gateway.store.sqlite", "SqliteStore.list_jobs"),
    ("qpu_gateway.store.sqlite", "SqliteStore.claim_many"),
    ("qpu_gateway.store.sqlite", "SqliteStore.transition"),
    ("qpu_gateway.store.sqlite", "SqliteStore.job_versions"),
    ("qpu_gateway.jobs.worker", "Workers._drive"),
    ("qpu_gateway.jobs.worker", "Workers._claim"),
)

_times: dict[str, list[float]] = defaultdict(list)


def _timed(name: str, func: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        label = name
        if name.endswith("run_sync"):  # Qiskit parsing (admission) or an Aer run (the adapter)
            label = f"{name} from {sys._getframe(1).f_globals.get('__name__', '?')}"
        began = time.perf_counter()
        try:
            return await func(*args, **kwargs)
        finally:
            _times[label].append(time.perf_counter() - began)

    return wrapper


def install(directory: Path) -> list[str]:
    """Wrap every target that exists; returns the ones skipped. Results go to `directory` at exit."""
    skipped = []
    for module_name, path in TARGETS:
        owner: Any = importlib.import_module(module_name)
        *parents, attribute = path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        func = getattr(owner, attribute, None) if owner is not None else None
        if func is None:
            skipped.append(f"{module_name}.{path}")
            continue
        setattr(owner, attribute, _timed(f"{module_name.removeprefix('qpu_gateway.')}.{path}", func))
    out = directory / f"phases-{os.getpid()}.json"
    atexit.register(lambda: out.write_text(json.dumps({"skipped": skipped, "seconds": _times}), encoding="utf-8"))
    return skipped


def report(paths: list[Path]) -> str:
    merged: dict[str, list[float]] = defaultdict(list)
    skipped: set[str] = set()
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        skipped.update(data["skipped"])
        for name, values in data["seconds"].items():
            merged[name] += values
    lines = [f"{'phase':<58} {'calls':>7} {'p50 ms':>8} {'mean ms':>8} {'total s':>8}"]
    for name, values in sorted(merged.items(), key=lambda item: -sum(item[1])):
        median, mean = statistics.median(values) * 1000, statistics.fmean(values) * 1000
        lines.append(f"{name:<58} {len(values):>7} {median:>8.3f} {mean:>8.3f} {sum(values):>8.2f}")
    if skipped:
        lines.append(f"(not found, skipped: {', '.join(sorted(skipped))})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path)
    print(report(parser.parse_args().files))


if __name__ == "__main__":
    main()
