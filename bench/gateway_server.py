"""The gateway's own MCP server plus one no-op tool: the per-call baseline, and the bench's runner of ours.

`qpu_gateway.mcp.app.build_server` returns the real server (the gateway middleware authenticates
every call against the database and writes its audit row); a `noop` tool is added to it here,
so `noop` costs exactly the gateway's per-call overhead and nothing else. The per-call ratios
(get_job, submit_job, a refused call) divide by it. Product code is not changed: the tool is
added from the outside, and the process runs the gateway (store, workers, policy watcher) just
as `qpu-gateway serve --transport stdio` does.

With `--transport http` it serves through the gateway's own `serve_http` instead: to trace
phases of the HTTP measures (`python -m bench --phases DIR`), and with `--noop` to measure the
gateway's own per-call floor over HTTP (the throughput measure's ceiling). The no-op is added by
wrapping `transports.build_server` from here, as phases wraps coroutines.

    QPU_GATEWAY_KEY=... python -m bench.gateway_server --db PATH --policy PATH
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import anyio
from mcp.server.mcpserver import MCPServer

from bench.phases import PHASES_ENV
from qpu_gateway.config import ENV_KEY, Config
from qpu_gateway.telemetry import logs


def stdio_key() -> str | None:
    """The key a stdio server reads, as the gateway's own stdio transport does."""
    return os.environ.get(ENV_KEY)


def with_noop(server: MCPServer) -> MCPServer:
    """Add the no-op tool: it runs inside the gateway middleware but does no gateway work."""

    @server.tool()
    async def noop() -> str:
        """Do nothing."""
        return "ok"

    return server


async def serve_stdio(config: Config) -> None:
    from qpu_gateway.jobs.runtime import Gateway
    from qpu_gateway.mcp.app import build_server

    gateway = Gateway(config)
    server = with_noop(build_server(gateway, stdio_key))
    async with gateway.running():
        await server.run_stdio_async()


async def serve_http(config: Config, port: int, *, noop: bool) -> None:
    from qpu_gateway.jobs.runtime import Gateway
    from qpu_gateway.mcp import transports

    if noop:
        build = transports.build_server
        transports.build_server = lambda *args, **kwargs: with_noop(build(*args, **kwargs))
    await transports.serve_http(Gateway(config), transport="http", host="127.0.0.1", port=port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", required=True)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--noop", action="store_true", help="with --transport http: add the no-op tool")
    args = parser.parse_args()
    logs.setup(args.log_level)
    if os.environ.get(PHASES_ENV):
        from bench import phases

        phases.install(Path(os.environ[PHASES_ENV]))
    config = Config.resolve(db=args.db, policy=args.policy)
    if args.transport == "stdio":
        anyio.run(serve_stdio, config)
    else:
        anyio.run(lambda: serve_http(config, args.port, noop=args.noop))


if __name__ == "__main__":
    main()
