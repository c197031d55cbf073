"""The MCP conformance suite's server scenarios (@modelcontextprotocol/conformance, npm-pinned in
tests/clients) against a real `qpu-gateway serve --transport http`, through a loopback proxy that adds
the bearer key (the suite sends no headers of its own). The scenarios the gateway cannot pass, because
they call the suite's own test tools, resources and prompts, are listed with the reason in
tests/clients/conformance-expected-failures.yml; the suite itself fails the run when the failures
differ from that list in either direction."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import pytest

from qpu_gateway.config import Config

from .bearer_proxy import bearer_proxy
from .js_clients import CLIENTS, CONFORMANCE, node22, package_version
from .support import new_key, start_http_server

pytestmark = pytest.mark.anyio

BASELINE = CLIENTS / "conformance-expected-failures.yml"
# What the gateway passes on its own merits; the README lists the same scenarios.
PASSING = {
    "server-initialize",
    "logging-set-level",
    "ping",
    "completion-complete",
    "tools-list",
    "tools-call-simple-text",
    "tools-call-error",
    "server-sse-multiple-streams",
    "resources-list",
    "prompts-list",
    "dns-rebinding-protection",
}


def scenario_results(out: Path) -> dict[str, set[str]]:
    """Scenario name -> the statuses of its checks, from the suite's own output files."""
    results: dict[str, set[str]] = {}
    for checks in out.glob("*/checks.json"):
        name = re.sub(r"-\d{4}-\d\d-\d\dT[\d-]+Z$", "", checks.parent.name.removeprefix("server-"))
        results[name] = {check["status"] for check in json.loads(checks.read_text(encoding="utf-8"))}
    return results


async def test_the_conformance_suites_server_scenarios_pass_except_the_listed_ones(
    config: Config, tmp_path: Path
) -> None:
    assert package_version("@modelcontextprotocol/conformance") == "0.1.16"
    key = await new_key(config.database, "conformance")
    server = start_http_server(config)
    out = tmp_path / "results"
    try:
        async with bearer_proxy(server.port, key) as base:
            suite = [node22(), str(CONFORMANCE), "server", "--url", f"{base}/mcp", "-o", str(out)]
            done = await anyio.run_process(
                [*suite, "--expected-failures", str(BASELINE)],
                env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
                check=False,
            )
    finally:
        server.stop()

    report = done.stdout.decode(errors="replace")
    assert done.returncode == 0, report[-4000:]
    assert "Baseline check passed" in report
    results = scenario_results(out)
    assert {name for name, statuses in results.items() if statuses == {"SUCCESS"}} == PASSING
    assert len(results) == len(PASSING) + BASELINE.read_text(encoding="utf-8").count("\n  - ")
