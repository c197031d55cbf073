"""A loopback HTTP proxy that adds `Authorization: Bearer <key>` to every request, for clients that
cannot send a header of their own (the MCP conformance suite's server scenarios)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import ByteReceiveStream, ByteSendStream, SocketStream, TaskStatus

HEAD_LIMIT = 64 * 1024
# Hop-by-hop headers the proxy owns (RFC 9110 7.6.1), and the one it adds.
REPLACED = (b"connection", b"keep-alive", b"proxy-connection", b"authorization")


@asynccontextmanager
async def bearer_proxy(upstream_port: int, key: str) -> AsyncIterator[str]:
    """Serve on a free loopback port while the block runs; yields its base URL.

    Each request is sent upstream on a connection of its own with `Connection: close`, so the
    upstream closes it after the response and the proxy never has to find where a body ends; a
    streamed response (SSE) is relayed as it comes.
    """
    async with anyio.create_task_group() as tg:
        port = await tg.start(_serve, upstream_port, key.encode())
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            tg.cancel_scope.cancel()


async def _serve(upstream_port: int, key: bytes, *, task_status: TaskStatus[int]) -> None:
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(lambda client: _relay(client, upstream_port, key))


async def _relay(client: SocketStream, upstream_port: int, key: bytes) -> None:
    async with client:
        head, rest = await _read_head(client)
        if head is None:
            return
        async with await anyio.connect_tcp("127.0.0.1", upstream_port) as upstream:
            await upstream.send(_with_bearer(head, key) + rest)
            # Whichever side is done first ends both: the upstream after its response, or the
            # client leaving a stream early (so the gateway sees it go).
            async with anyio.create_task_group() as tg:

                async def one_way(source: SocketStream, sink: SocketStream) -> None:
                    await _pipe(source, sink)
                    tg.cancel_scope.cancel()

                tg.start_soon(one_way, client, upstream)
                tg.start_soon(one_way, upstream, client)


async def _read_head(stream: ByteReceiveStream) -> tuple[bytes | None, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > HEAD_LIMIT:
            return None, b""
        try:
            data += await stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return None, b""
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def _with_bearer(head: bytes, key: bytes) -> bytes:
    request_line, *headers = head.split(b"\r\n")
    kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in REPLACED]
    added = [b"Authorization: Bearer " + key, b"Connection: close"]
    return b"\r\n".join([request_line, *kept, *added]) + b"\r\n\r\n"


async def _pipe(source: ByteReceiveStream, sink: ByteSendStream) -> None:
    try:
        async for chunk in source:
            await sink.send(chunk)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass
