"""Serving one of the gateway's own HTTP apps alone, with no MCP server or workers beside it.

For installations whose processes are all stdio servers (one per client session, none serving
HTTP): `qpu-gateway metrics serve` (every process's counters summed from the snapshots they write,
server/telemetry/snapshots.py, and the database-wide gauges) and `qpu-gateway console serve` (the
operator console, server/ops/console/). Either reads and writes only the database every gateway
process shares, and the policy file, which it reloads as the gateways do.
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp

from qpu_gateway.config import Config
from qpu_gateway.jobs.policy_source import CHECK_INTERVAL_S, PolicySource
from qpu_gateway.store import open_store
from qpu_gateway.telemetry.endpoint import MetricsEndpoint, installation_exposition

log = logging.getLogger(__name__)


async def serve_alone(app: ASGIApp, source: PolicySource, *, host: str, port: int, what: str) -> None:
    """Serve `app` on host:port until interrupted (uvicorn stops on SIGINT and SIGTERM), reloading
    the policy file meanwhile; `what` names it in the log line, e.g. "metrics at /metrics"."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="off")
    )
    log.info("serving %s on http://%s:%d", what, host, port)
    async with anyio.create_task_group() as tg:
        tg.start_soon(source.watch, CHECK_INTERVAL_S)
        await server.serve()
        tg.cancel_scope.cancel()


async def serve_installation_metrics(config: Config, *, host: str, port: int) -> None:
    """`metrics serve`: GET /metrics for every process on the database (it writes only the retirement
    of gone processes' snapshots)."""
    store = await open_store(config.database)
    source = PolicySource(config.policy_path)  # budgets are read against the caps in force
    try:
        app = MetricsEndpoint(None, installation_exposition(store, lambda: source.current))
        await serve_alone(app, source, host=host, port=port, what="installation metrics at /metrics")
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
