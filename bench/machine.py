"""The machine a run happened on: figures from another machine are not comparable, ratios roughly are."""

from __future__ import annotations

import os
import platform
import socket
from importlib import metadata
from typing import Any

PACKAGES = ("mcp", "qiskit", "qiskit-aer", "anyio", "aiosqlite", "uvicorn", "qpu-gateway")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        return None


def describe() -> dict[str, Any]:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = _memory_gb()
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "cpu": _cpu_model(),
        "memory_gb": round(memory, 1) if memory else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": {name: _version(name) for name in PACKAGES},
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def one_line(info: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    return (
        f"{info['host']}: {info['cores']} cores ({info['cpu']}), {info['memory_gb']} GB, "
        f"Python {info['python']}; {packages}"
    )
