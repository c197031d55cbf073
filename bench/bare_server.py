"""The baseline server: a bare `MCPServer` with one no-op tool, over stdio or Streamable HTTP.

It is what an MCP server costs before any gateway work, on the same Python and SDK: the
denominator of the start-up, memory and throughput ratios. It imports nothing of qpu_gateway.

    python -m bench.bare_server stdio
    python -m bench.bare_server http --port 8800
"""

from __future__ import annotations

import argparse

import anyio
from mcp.server.mcpserver import MCPServer


def build() -> MCPServer:
    """One tool that does nothing, so a call measures the SDK and the transport alone."""
    server = MCPServer("bench-bare", log_level="WARNING")

    @server.tool()
    async def noop() -> str:
        """Do nothing."""
        return "ok"

    return server


async def serve_http(server: MCPServer, port: int) -> None:
    """Serve Streamable HTTP at /mcp the way the gateway's `serve --transport http` does (uvicorn, lifespan on)."""
    import uvicorn

    app = server.streamable_http_app(host="127.0.0.1")
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", log_config=None, lifespan="on")
    await uvicorn.Server(config).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--port", type=int, default=8800)
    args = parser.parse_args()
    server = build()
    if args.transport == "stdio":
        anyio.run(server.run_stdio_async)
    else:
        anyio.run(serve_http, server, args.port)


if __name__ == "__main__":
    main()
