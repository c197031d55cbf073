"""Test helpers: circuits, keys, and MCP clients over real transports (in-memory, stdio, HTTP)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from qpu_gateway.config import Config, Database
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.keys import SCOPES, create_key
from qpu_gateway.mcp.app import build_server
from qpu_gateway.store import open_store

BELL2 = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[2];
creg c[2];
h q[0];
cx q[0], q[1];
measure q -> c;
"""

BELL3 = """OPENQASM 3.0;
include "stdgates.inc";
qubit[2] q;
bit[2] c;
h q[0];
cx q[0], q[1];
c = measure q;
"""

ERAS = ["legacy", "2026-07-28"]


def body(result: Any) -> dict[str, Any]:
    """A tool result's body as an agent reads it: a success's structured content, an error's JSON text.

    Errors carry no structured content (clients check structured content against the tool's output
    schema, which describes the success), so the coded body is the text; a success has both.
    """
    if result.is_error:
        assert result.structured_content is None, result.structured_content
        return dict(json.loads(result.content[0].text))
    assert result.structured_content is not None, result.content
    return dict(result.structured_content)


async def new_key(db: Database | Path, agent: str, *, project: str = "default", scopes: str = ",".join(SCOPES)) -> str:
    store = await open_store(db)
    try:
        _, key = await create_key(store, agent=agent, project=project, scopes=frozenset(scopes.split(",")))
    finally:
        await store.close()
    return key


@asynccontextmanager
async def in_memory(gateway: Gateway, key: str | None, *, mode: str = "auto") -> AsyncIterator[Client]:
    """A real MCP client session to the gateway's server object, in-process."""
    server = build_server(gateway, lambda: key)
    async with Client(server, mode=mode) as client:  # type: ignore[arg-type]
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def gateway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qpu_gateway", *args]


def set_up_database(db: Database | Path) -> None:
    """Create and migrate the database as `qpu-gateway init` would (without its key), since `serve`
    refuses a database nobody set up. Runs in a thread of its own: callers may be inside a loop."""

    async def migrate() -> None:
        await (await open_store(db)).close()

    if (isinstance(db, Database) and db.is_postgres) or not Path(location_of(db)).exists():
        worker = threading.Thread(target=anyio.run, args=(migrate,))
        worker.start()
        worker.join()


def location_of(db: Database | Path) -> str:
    """What `--db` takes for `db`."""
    if isinstance(db, Path):
        return str(db)
    return db.url if db.url is not None else str(db.path)


def server_env(config: Config) -> dict[str, str]:
    """The environment a gateway subprocess needs for `config` beyond its flags."""
    environment = {"QPU_GATEWAY_LEASE_S": str(config.lease_s)}
    if config.rate_storage is not None:
        environment["QPU_GATEWAY_RATE_STORAGE"] = config.rate_storage
    return environment


def stdio_params(config: Config, key: str | None, **env: str) -> StdioServerParameters:
    set_up_database(config.database)
    environment = {**server_env(config), **env}
    if key is not None:
        environment["QPU_GATEWAY_KEY"] = key
    return StdioServerParameters(
        command=sys.executable,
        args=[
            "-m",
            "qpu_gateway",
            "serve",
            "--transport",
            "stdio",
            "--db",
            location_of(config.database),
            "--policy",
            str(config.policy_path),
            "--log-level",
            "warning",
        ],
        env=environment,
    )


@dataclass
class HttpServer:
    url: str
    process: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes], *, grace_s: float = 15.0) -> None:
    """SIGTERM, and SIGKILL if the process has not exited after `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_listening(process: subprocess.Popen[bytes], port: int, *, what: str = "server", within_s: float = 30) -> None:
    """Wait until `process` accepts connections on 127.0.0.1:`port`; raise if it exits or never does."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"{what} did not start listening")


def start_http_server(config: Config, transport: str = "http", **env: str) -> HttpServer:
    """`qpu-gateway serve` as a real subprocess on a free loopback port; waits until it accepts."""
    set_up_database(config.database)
    port = free_port()
    process = subprocess.Popen(
        gateway_cmd(
            "serve",
            "--transport",
            transport,
            "--port",
            str(port),
            "--db",
            location_of(config.database),
            "--policy",
            str(config.policy_path),
            "--log-level",
            "warning",
        ),
        env={**os.environ, **server_env(config), **env},
        stdout=subprocess.DEVNULL,
    )
    wait_listening(process, port)
    path = "/mcp" if transport == "http" else "/sse"
    return HttpServer(url=f"http://127.0.0.1:{port}{path}", process=process, port=port)


@asynccontextmanager
async def http_client(url: str, key: str | None, *, mode: str = "auto") -> AsyncIterator[Client]:
    """A real MCP client over Streamable HTTP with the key as a bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http,
        Client(streamable_http_client(url, http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        yield client


async def eventually(check: Callable[[], Awaitable[bool]], *, within_s: float = 30.0, every: float = 0.1) -> None:
    """Poll `check` until it holds; fail after `within_s` seconds."""
    for _ in range(int(within_s / every)):
        if await check():
            return
        await anyio.sleep(every)
    raise AssertionError(f"condition not met within {within_s} s")
