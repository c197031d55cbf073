"""`qpu-gateway metrics serve`: one scrape target for every gateway process on a database.

For installations whose processes are all stdio servers (one per client session, none to
scrape): it serves `/metrics` with every process's counters summed from the snapshots they write
(server/telemetry/snapshots.py) and the database-wide gauges. It runs no workers and serves no
MCP; it writes only the retirement of gone processes' snapshots.
"""

from __future__ import annotations

import logging

import anyio

from qpu_gateway.config import Config
from qpu_gateway.jobs.policy_source import CHECK_INTERVAL_S, PolicySource
from qpu_gateway.store import open_store
from qpu_gateway.telemetry.endpoint import MetricsEndpoint, installation_exposition

log = logging.getLogger(__name__)


async def serve_installation_metrics(config: Config, *, host: str, port: int) -> None:
    """Serve GET /metrics on host:port until interrupted."""
    import uvicorn

    store = await open_store(config.database)
    source = PolicySource(config.policy_path)  # budgets are read against the caps in force
    try:
        app = MetricsEndpoint(None, installation_exposition(store, lambda: source.current))
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="off")
        )
        log.info("serving installation metrics on http://%s:%d/metrics", host, port, extra={"db": str(config.database)})
        async with anyio.create_task_group() as tg:
            tg.start_soon(source.watch, CHECK_INTERVAL_S)
            await server.serve()
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
