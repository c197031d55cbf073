"""Serving the console: in front of a gateway's HTTP app, or on its own (`qpu-gateway console serve`).

On its own it runs no workers and serves no MCP: it reads and writes the database every gateway
process shares, and those processes see its acts there (an approval is claimed at their next poll).
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp

from qpu_gateway.config import Config
from qpu_gateway.jobs.policy_source import PolicySource
from qpu_gateway.jobs.providers import Providers
from qpu_gateway.jobs.ratelimit import RateLimiter, storage_uri_for
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.ops.console.app import Console, ConsoleFront, build_app
from qpu_gateway.ops.standalone import serve_alone
from qpu_gateway.store import open_store

log = logging.getLogger(__name__)


def in_front(app: ASGIApp, gateway: Gateway) -> ASGIApp:
    """`app` with the console answering under /console, acting through this running gateway."""
    console = Console.of(
        gateway.store,
        gateway.rate_limiter.strategy,
        gateway.rate_limiter.namespace,
        gateway.policy_source,
        providers=gateway.providers,
        announce=gateway.events.announce,
        wake=gateway.workers.wake,
        breakers=lambda: dict(gateway.workers.breakers.states()),
    )
    return ConsoleFront(app, build_app(console))


async def serve_console(config: Config, *, host: str, port: int) -> None:
    """Serve the console alone on host:port until interrupted."""
    uri = storage_uri_for(config)  # failed logins are counted where every process counts them
    store = await open_store(config.database)
    limiter = RateLimiter(uri, namespace=store.rate_namespace())
    source = PolicySource(config.policy_path)
    try:
        console = Console.of(store, limiter.strategy, limiter.namespace, source, providers=Providers(config))
        await serve_alone(build_app(console), source, host=host, port=port, what="the operator console at /console")
    finally:
        with anyio.CancelScope(shield=True):
            await limiter.aclose()
            await store.close()
