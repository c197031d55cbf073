"""Spawn → `initialize` reply over stdio, and idle resident memory after `tools/list`.

Both compare `qpu-gateway serve --transport stdio` (the command mcp.json runs, against a
database that already exists, as on every session after the first) with the bare server, same
Python, spawned alternately so drift on a shared machine hits both sides alike. Memory is read
after the server has answered `tools/list` and then sat idle for a second (its background loops
have started and ticked): what a client's idle server costs while the agent thinks.
"""

from __future__ import annotations

import os
import time

from bench import env, policies
from bench.context import Context
from bench.model import Row, Target
from bench.raw import RawServer, rss_mb
from bench.stats import Summary

NAMES = ("startup", "idle_rss")
IDLE_S = 1.0


def _spawn(argv: list[str], extra_env: dict[str, str], *, memory: bool) -> tuple[float, float | None]:
    server = RawServer(argv, {**os.environ, **extra_env})
    try:
        elapsed = server.initialize()
        rss = None
        if memory:
            server.request("tools/list")
            time.sleep(IDLE_S)
            rss = rss_mb(server.process.pid)
        return elapsed, rss
    finally:
        server.close()


async def run(ctx: Context, names: set[str]) -> list[Row]:
    files = await env.gateway_files(ctx.scratch("startup"), policies.admitting())
    ours_argv, bare_argv = env.cli_stdio_argv(files), env.bare_stdio_argv()
    repeats = ctx.pick(10, 3)
    memory = "idle_rss" in names
    samples: dict[str, list[float]] = {"ours_s": [], "bare_s": [], "ours_mb": [], "bare_mb": []}
    _spawn(ours_argv, env.key_env(files), memory=False)  # warm the OS file cache for both
    _spawn(bare_argv, {}, memory=False)
    for i in range(repeats):
        order = [("ours", ours_argv, env.key_env(files)), ("bare", bare_argv, {})]
        for side, argv, extra in order if i % 2 == 0 else reversed(order):
            elapsed, rss = _spawn(argv, extra, memory=memory)
            samples[f"{side}_s"].append(elapsed * 1000)
            if rss is not None:
                samples[f"{side}_mb"].append(rss)
        ctx.log(f"startup {i + 1}/{repeats}: ours {samples['ours_s'][-1]:.0f} ms, bare {samples['bare_s'][-1]:.0f} ms")
    rows = []
    if "startup" in names:
        rows.append(
            Row(
                "spawn → initialize reply, stdio",
                "ms",
                Summary.of(samples["bare_s"], latency=True),
                Summary.of(samples["ours_s"], latency=True),
                Target("<=", 1.2),
                "bare MCPServer, one no-op tool",
                notes=[f"{repeats} spawns each, alternating; clock from Popen to the reply line"],
            )
        )
    if "idle_rss" in names:
        rows.append(
            Row(
                "idle RSS after tools/list",
                "MB",
                Summary.of(samples["bare_mb"]),
                Summary.of(samples["ours_mb"]),
                Target("<=", 1.3),
                "the same bare server",
                notes=[f"VmRSS {IDLE_S:g} s after the tools/list reply"],
            )
        )
    return rows
