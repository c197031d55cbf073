"""`GET /metrics`: the Prometheus text exposition, for a scraper the operator allows.

The series name agents and projects and what they spent, so the endpoint is not for agents: with
`QPU_GATEWAY_METRICS_TOKEN` set it asks for `Authorization: Bearer <that token>` (Prometheus's
`authorization` scrape setting); without one it answers loopback peers only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable

import anyio
from prometheus_client import Metric
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from qpu_gateway.jobs.processes import LIVE_FOR_S
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.policy.file import Policy
from qpu_gateway.store import Store, StoreError
from qpu_gateway.telemetry.metrics import CONTENT_TYPE, exposition_of, read_state
from qpu_gateway.telemetry.snapshots import REFRESH_S, RETIRE_AFTER_S, families, retire

log = logging.getLogger(__name__)

ENV_SCRAPE_KEY = "QPU_GATEWAY_METRICS_TOKEN"
PATH = "/metrics"
STATE_FOR_S = 2.0  # scrapes closer together than this share one read of the database


class StateReads:
    """The database-wide gauges, read at most once every STATE_FOR_S however many scrapes come."""

    def __init__(self, read: Callable[[], Awaitable[list[Metric]]]) -> None:
        self._read = read
        self._lock = anyio.Lock()
        self._kept: tuple[float, list[Metric]] | None = None

    async def __call__(self) -> list[Metric]:
        async with self._lock:
            if self._kept is not None and time.monotonic() - self._kept[0] < STATE_FOR_S:
                return self._kept[1]
            metrics = await self._read()
            self._kept = (time.monotonic(), metrics)
            return metrics


def process_exposition(gateway: Gateway) -> Callable[[], Awaitable[bytes]]:
    """This process's counters and the database's gauges (a serving gateway's /metrics)."""
    state = StateReads(lambda: read_state(gateway.store, gateway.policy))

    async def body() -> bytes:
        return gateway.metrics.exposition() + exposition_of(await state())

    return body


def installation_exposition(store: Store, policy: Callable[[], Policy]) -> Callable[[], Awaitable[bytes]]:
    """Every process's counters summed from the database, and its gauges (`qpu-gateway metrics serve`)."""
    retired_at = 0.0

    async def read() -> list[Metric]:
        nonlocal retired_at
        now = time.time()
        seen = await store.processes(now - RETIRE_AFTER_S)
        if now - retired_at >= REFRESH_S:  # as often as each process's Publisher: not a write per scrape
            retired_at = now
            await retire(store, now, seen)
        live = [p.id for p in seen if p.seen_at > now - LIVE_FOR_S]  # gauges: the processes up now
        return families(await store.metric_snapshots(), live=live) + await read_state(store, policy(), now)

    state = StateReads(read)

    async def body() -> bytes:
        return exposition_of(await state())

    return body


class MetricsEndpoint:
    """ASGI middleware answering GET /metrics itself and passing every other request on."""

    def __init__(self, app: ASGIApp | None, body: Callable[[], Awaitable[bytes]], *, token: str | None = None) -> None:
        self.app = app
        self.body = body
        self.token = token if token is not None else os.environ.get(ENV_SCRAPE_KEY) or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH:
            if self.app is None:
                await _answer(send, 404, {"code": "not_found", "message": f"Only {PATH} is served here."})
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, {"code": "invalid_request", "message": f"{PATH} answers GET only."})
            return
        refused = self._refusal(scope)
        if refused is not None:
            await _answer(send, 401 if self.token else 403, {"code": "forbidden", "message": refused})
            return
        try:
            body = await self.body()
        except StoreError as exc:
            await _answer(send, 503, {"code": "unavailable", "message": str(exc)})
            return
        headers = [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    def _refusal(self, scope: Scope) -> str | None:
        if self.token:
            sent = Headers(scope=scope).get("authorization", "")
            if sent[:7].lower() == "bearer " and hmac.compare_digest(sent[7:].strip().encode(), self.token.encode()):
                return None
            return f"{PATH} needs the metrics token: send `Authorization: Bearer <{ENV_SCRAPE_KEY}>`."
        client = scope.get("client")
        if client and _loopback(str(client[0])):
            return None
        return (
            f"{PATH} answers loopback peers only unless the operator sets {ENV_SCRAPE_KEY} "
            "(then it asks for that token as a bearer token)."
        )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _answer(send: Send, status: int, body: dict[str, str]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
