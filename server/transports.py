"""Serving the gateway over stdio, Streamable HTTP or SSE, with the key each one carries.

stdio: the key is `QPU_GATEWAY_KEY` in the server's environment (mcp.json's `env`).
HTTP and SSE: `Authorization: Bearer KEY` on every request, checked against the store by the SDK's
token-verifier hook before any MCP work; the gateway middleware takes the principal it found.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable

import anyio
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from qpu_gateway.app import build_server
from qpu_gateway.config import ENV_KEY
from qpu_gateway.errors import GatewayError
from qpu_gateway.keys import Principal, authenticate
from qpu_gateway.records import AuditEntry, Pause
from qpu_gateway.runtime import Gateway
from qpu_gateway.store import StoreError

log = logging.getLogger(__name__)


class GatewayTokenVerifier:
    """The SDK's `TokenVerifier` over gateway keys: a bearer token is a gateway key."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            who = await authenticate(self.gateway.store, token)
        except (GatewayError, StoreError) as exc:
            reason = exc.code if isinstance(exc, GatewayError) else "store_error"
            entry = AuditEntry(tool="http.auth", decision="refused", error_code="unauthorized", detail=reason)
            await self.gateway.audit_spool.write(self.gateway.store, entry, time.time())
            return None
        return AccessToken(
            token=token,
            client_id=who.key_id,
            scopes=sorted(who.scopes),
            subject=who.agent,
            claims={"project": who.project, "paused": None if who.paused is None else dataclasses.astuple(who.paused)},
        )


def bearer_principal() -> Principal | None:
    """The principal the token verifier found for this HTTP request's bearer key (checked against
    the store moments ago, on this same request, so a revoked key still stops at its next request)."""
    token = get_access_token()
    if token is None or token.subject is None or not token.claims:
        return None
    paused = token.claims.get("paused")
    return Principal(
        agent=token.subject,
        project=str(token.claims["project"]),
        scopes=frozenset(token.scopes),
        key_id=token.client_id,
        paused=None if paused is None else Pause(*paused),
    )


def stdio_key() -> str | None:
    return os.environ.get(ENV_KEY)


async def _stop_on_signal(stop: Callable[[], None]) -> None:
    """SIGTERM or SIGINT: stop serving, so the gateway hands its jobs back before the process exits."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping on signal %s", signal.Signals(signum).name)
            stop()
            return


async def serve_stdio(gateway: Gateway) -> None:
    mcp = build_server(gateway, stdio_key)
    async with gateway.running(), anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope.cancel)
        await mcp.run_stdio_async()
        tg.cancel_scope.cancel()


async def serve_http(gateway: Gateway, *, transport: str, host: str, port: int) -> None:
    """Serve Streamable HTTP (`/mcp`) or SSE (`/sse`) on host:port until interrupted."""
    import uvicorn

    base = f"http://{_url_host(host)}:{port}"
    path = "/mcp" if transport == "http" else "/sse"
    auth = AuthSettings(
        issuer_url=base,  # type: ignore[arg-type]  # pydantic parses the URL string
        resource_server_url=f"{base}{path}",  # type: ignore[arg-type]
        validate_token_resource=False,  # our tokens are gateway keys, not audience-bound OAuth tokens
    )
    mcp = build_server(gateway, bearer_principal, token_verifier=GatewayTokenVerifier(gateway), auth=auth)
    app = mcp.streamable_http_app(host=host) if transport == "http" else mcp.sse_app(host=host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on")
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True

    async with gateway.running(), anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, stop)
        await server.serve()
        tg.cancel_scope.cancel()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def run(gateway: Gateway, *, transport: str, host: str, port: int) -> None:
    if transport == "stdio":
        anyio.run(serve_stdio, gateway)
    else:
        anyio.run(lambda: serve_http(gateway, transport=transport, host=host, port=port))
