"""`qpu-gateway quota set`: limits changed from the command line, kept in their own TOML file.

The operator's policy file keeps its comments and layout untouched; the overrides file beside
it (`policy.overrides.toml`) is written only by the CLI and merged over the policy file by
every process when it changes. A change is validated against the merged policy before it is
written, so a bad value never reaches a running gateway.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from qpu_gateway.policy.file import PolicyFileError, default_policy_text, overrides_path, parse_policy

QUOTA_KEYS = (
    "cost_usd.day",
    "cost_usd.month",
    "cost_usd.total",
    "shots.day",
    "shots.month",
    "shots.total",
    "qpu_seconds.day",
    "qpu_seconds.month",
    "qpu_seconds.total",
    "running_jobs",
    "queued_jobs",
)


def set_quota(policy_path: Path, *, level: list[str], quota: str, key: str, value: str | None) -> Path:
    """Set (or, with value None, remove) `<quota>.<key>` at `level` (['defaults'], ['projects', P], ...)."""
    if quota not in ("agent_quota", "project_quota") or key not in QUOTA_KEYS:
        raise ValueError(f"quota keys are agent_quota|project_quota . one of {', '.join(QUOTA_KEYS)}")
    path = overrides_path(policy_path)
    data = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    table = data
    for part in level:
        table = table.setdefault(part, {})
    node = table
    *parents, leaf = [quota, *key.split(".")]
    for part in parents:
        node = node.setdefault(part, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = _value(key, value)
    text = policy_path.read_text(encoding="utf-8") if policy_path.exists() else default_policy_text()
    parse_policy(text, path=str(policy_path), overrides=data)  # raises PolicyFileError: nothing written
    _write_atomically(path, _to_toml(data))
    return path


def _value(key: str, value: str) -> Any:
    if key.startswith("cost_usd") or key.startswith("qpu_seconds"):
        return value  # kept as the exact decimal string the operator typed
    try:
        return int(value)
    except ValueError:
        raise PolicyFileError("quota set", f"{key} takes a whole number; got {value!r}") from None


def _to_toml(data: dict[str, Any]) -> str:
    lines = ["# Written by `qpu-gateway quota set`; merged over the policy file. Do not edit by hand.", ""]
    for section, path in _tables(data, []):
        if not section:
            continue
        lines.append("[" + ".".join(json.dumps(p) for p in path) + "]")
        for dotted, value in _leaves(section, []):
            lines.append(f"{'.'.join(dotted)} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _tables(data: dict[str, Any], path: list[str]) -> list[tuple[dict[str, Any], list[str]]]:
    """Level tables ([defaults], [projects."p"], [agents."a"]) with their quota leaves."""
    out: list[tuple[dict[str, Any], list[str]]] = []
    if "defaults" in data:
        out.append((data["defaults"], ["defaults"]))
    for kind in ("projects", "agents"):
        for name, table in data.get(kind, {}).items():
            out.append((table, [kind, name]))
    return out


def _leaves(table: dict[str, Any], prefix: list[str]) -> list[tuple[list[str], Any]]:
    out: list[tuple[list[str], Any]] = []
    for key, value in table.items():
        if isinstance(value, dict):
            out += _leaves(value, [*prefix, key])
        else:
            out.append(([*prefix, key], value))
    return out


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
