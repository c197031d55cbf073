"""Serving the gateway over stdio, Streamable HTTP or SSE, with the key each one carries.

stdio: the key is `QPU_GATEWAY_KEY` in the server's environment (mcp.json's `env`).
HTTP and SSE: `Authorization: Bearer KEY` on every request. `KeyGate` checks it against the store
before the SDK sees the request and answers a missing or refused key with a 401 that says how to
get and send one; the SDK's token-verifier hook then takes the principal the gate found (binding
the session to it), and the gateway middleware takes it from there.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TypeAlias

import anyio
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import RequestStateSecurity
from mcp_types import INVALID_REQUEST
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from qpu_gateway.config import ENV_DB, ENV_KEY
from qpu_gateway.errors import GatewayError, Unavailable
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.keys import Principal, authenticate
from qpu_gateway.mcp.app import build_server
from qpu_gateway.mcp.calls import store_failure
from qpu_gateway.store import StoreError
from qpu_gateway.store.records import AuditEntry, Pause
from qpu_gateway.telemetry import tracing
from qpu_gateway.telemetry.endpoint import MetricsEndpoint, process_exposition

log = logging.getLogger(__name__)

HOW_TO_SEND_A_KEY = (
    "Ask the gateway's operator for a key (`qpu-gateway keys create --agent NAME`) and send it on every "
    "request as the header `Authorization: Bearer <key>`. This gateway uses its own keys, not OAuth: "
    "there is no authorization server to sign in with."
)
NO_KEY = f"No gateway key was sent. {HOW_TO_SEND_A_KEY}"
REFUSED_KEY = f"The gateway key sent was refused: it is unknown, malformed, revoked or expired. {HOW_TO_SEND_A_KEY}"
_MAX_READ_FOR_ID = 1_000_000  # bytes of a refused request read to find its JSON-RPC id
UNCHECKED_KEY = (
    "The gateway key could not be checked: the gateway's database did not answer. Try again shortly; "
    "tell the operator if it persists."
)

# The key the gate checked for this request and what it found, so the SDK's verifier (asked next,
# for the same request) does not read the store again.
_CHECKED: ContextVar[tuple[str, AccessToken] | None] = ContextVar("qpu_gateway_checked_key", default=None)

# What the caller puts in front of the HTTP app (the operator console, from server/ops/): given to
# `run` rather than imported here, so the MCP face does not reach up into the operator tools.
Front: TypeAlias = Callable[[ASGIApp, Gateway], ASGIApp]


class GatewayTokenVerifier:
    """The SDK's `TokenVerifier` over gateway keys: a bearer token is a gateway key."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def verify_token(self, token: str) -> AccessToken | None:
        checked = _CHECKED.get()
        if checked is not None and checked[0] == token:
            return checked[1]
        try:
            access, _ = await self.check(token)
        except Unavailable:
            return None
        return access

    async def check(self, token: str | None) -> tuple[AccessToken | None, str]:
        """The access token for a gateway key, or None and why not; every refusal is an `http.auth` row.

        Raises `Unavailable` when the database did not answer for a while (down, restarting): the key
        is then neither good nor bad, and the caller is told to come back, not that its key failed.
        """
        try:
            who = await authenticate(self.gateway.store, token)
        except (GatewayError, StoreError) as exc:
            outage = store_failure(exc) if isinstance(exc, StoreError) else None
            if token is None:
                reason, message = "no key", NO_KEY
            elif isinstance(exc, GatewayError):
                reason, message = exc.code, REFUSED_KEY
            else:
                reason, message = "store_error", UNCHECKED_KEY
            code = "unavailable" if isinstance(outage, Unavailable) else "unauthorized"
            entry = AuditEntry(tool="http.auth", decision="refused", error_code=code, detail=reason)
            await self.gateway.audit_spool.write(self.gateway.store, entry, time.time())
            if isinstance(outage, Unavailable) and token is not None:
                raise outage from None
            return None, message
        access = AccessToken(
            token=token or "",
            client_id=who.key_id,
            scopes=sorted(who.scopes),
            subject=who.agent,
            claims={"project": who.project, "paused": None if who.paused is None else dataclasses.astuple(who.paused)},
        )
        return access, ""


class KeyGate:
    """ASGI middleware before the SDK's app: requests to the MCP endpoints need a valid gateway key.

    Without one the answer is a 401 whose `WWW-Authenticate` header and JSON body say how to get a
    key and send it. It names no authorization server and points to no protected-resource
    metadata, because the gateway has neither: keys come from its operator. (The SDK's own 401
    pointed OAuth clients at metadata naming the gateway as its authorization server, so they tried
    to register with it and failed: `Dynamic Client Registration rejected (HTTP 404)`.)
    """

    def __init__(self, app: ASGIApp, verifier: GatewayTokenVerifier, paths: tuple[str, ...]) -> None:
        self.app = app
        self.verifier = verifier
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._guarded(str(scope["path"])):
            await self.app(scope, receive, send)
            return
        token = bearer_token(Headers(scope=scope).get("authorization"))
        try:
            access, message = await self.verifier.check(token)
        except Unavailable as exc:
            await _unavailable(send, exc, await _request_id(scope, receive))
            return
        if access is None:
            await _unauthorized(send, message, key_sent=token is not None)
            return
        checked = _CHECKED.set((token or "", access))
        try:
            await self.app(scope, receive, send)
        finally:
            _CHECKED.reset(checked)

    def _guarded(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.paths)


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header, as the SDK's backend reads it (so they compare)."""
    if header is None or header[:7].lower() != "bearer ":
        return None
    return header[7:] or None


async def _unauthorized(send: Send, message: str, *, key_sent: bool) -> None:
    # RFC 6750 section 3.1: a request that sent no credentials gets no error code, only the challenge.
    challenge = 'Bearer realm="qpu-gateway"'
    if key_sent:
        challenge += ', error="invalid_token"'
    challenge += f', error_description="{message}"'
    body = json.dumps({"code": "unauthorized", "message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", challenge.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _request_id(scope: Scope, receive: Receive) -> str | int | None:
    """The JSON-RPC id of a POSTed request (read here, since it will not be passed on), else None."""
    if scope.get("method") != "POST":
        return None
    chunks: list[bytes] = []
    while sum(map(len, chunks)) <= _MAX_READ_FOR_ID:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        return None
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str | int) and not isinstance(found, bool) else None


async def _unavailable(send: Send, error: Unavailable, request_id: str | int | None) -> None:
    """503 with Retry-After, and the coded body as a JSON-RPC error, which MCP clients hand to the
    caller as the request's error (a 401 would tell them the key is bad, and it may not be)."""
    failure = {"code": INVALID_REQUEST, "message": f"{error.code}: {error.message}", "data": error.body()}
    body = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": failure}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(math.ceil(error.retry_after_s or 1)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


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


def stdio_key_hint(gateway: Gateway) -> str:
    return (
        f"This stdio server takes its key from {ENV_KEY} in its own environment and checks it against the "
        f"gateway database {gateway.config.database}; a key made for another database is unknown here "
        f"(set {ENV_DB} in the server's environment, or --db, to use another)."
    )


async def serve_stdio(gateway: Gateway) -> None:
    mcp = build_server(gateway, stdio_key, key_hint=stdio_key_hint(gateway))
    async with gateway.running(), anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, tg.cancel_scope.cancel)
        await mcp.run_stdio_async()
        tg.cancel_scope.cancel()


async def serve_http(gateway: Gateway, *, transport: str, host: str, port: int, front: Front | None = None) -> None:
    """Serve Streamable HTTP (`/mcp`) or SSE (`/sse`) on host:port until interrupted."""
    import uvicorn

    # The SDK's auth stack stays (it binds each session to the key that opened it), but with no
    # resource_server_url it serves no protected-resource metadata; issuer_url, which the settings
    # require, is then published nowhere (there is no authorization-server provider either).
    auth = AuthSettings(
        issuer_url=f"http://{_url_host(host)}:{port}",  # type: ignore[arg-type]  # pydantic parses it
        resource_server_url=None,
    )
    verifier = GatewayTokenVerifier(gateway)
    async with gateway.running(), anyio.create_task_group() as tg:
        mcp = build_server(
            gateway,
            bearer_principal,
            token_verifier=verifier,
            auth=auth,
            request_state=await shared_request_state(gateway),
        )
        if transport == "http":
            gated = KeyGate(mcp.streamable_http_app(host=host), verifier, ("/mcp",))
        else:
            gated = KeyGate(mcp.sse_app(host=host), verifier, ("/sse", "/messages/"))
        app: ASGIApp = MetricsEndpoint(gated, process_exposition(gateway))
        if front is not None:
            app = front(app, gateway)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None, lifespan="on")
        server = uvicorn.Server(config)

        def stop() -> None:
            server.should_exit = True

        tg.start_soon(_stop_on_signal, stop)
        await server.serve()
        tg.cancel_scope.cancel()


async def shared_request_state(gateway: Gateway) -> RequestStateSecurity:
    """The sealing of 2026-07-28 elicitation rounds under a key every replica on this database shares.

    On 2026-07-28 a question to the person (an approval) ends the call with `input_required` and the
    client calls again with the answer and the sealed `requestState`; behind a load balancer that
    second call may reach another replica. The SDK's default key lives in one process only, and
    another replica answered "Invalid or expired requestState". The key is made by the first
    process that needs it and kept in the database, which every replica already shares.
    """
    key = await gateway.store.shared_secret("request_state", secrets.token_bytes(32))
    return RequestStateSecurity(keys=[key])


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def run(gateway: Gateway, *, transport: str, host: str, port: int, front: Front | None = None) -> None:
    tracing.configure()
    try:
        if transport == "stdio":
            anyio.run(serve_stdio, gateway)
        else:
            anyio.run(lambda: serve_http(gateway, transport=transport, host=host, port=port, front=front))
    finally:
        tracing.shutdown()
