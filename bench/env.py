"""Where measures run: throw-away gateway files, server command lines, and MCP clients.

Every server is a real process started the way a client starts it, with the same Python that
runs the suite. Clients are the SDK's own (`mcp.Client`), over the transport each measure names.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from bench.phases import PHASES_ENV
from qpu_gateway.config import Database
from qpu_gateway.keys import SCOPES, create_key
from qpu_gateway.store import open_store

REPO = Path(__file__).resolve().parent.parent
# Set by `python -m bench --profile DIR`: our server processes then run under cProfile, each
# writing DIR/ours-<n>.prof when it exits (the bare baseline is never profiled).
PROFILE_ENV = "QPU_BENCH_PROFILE_DIR"
_profiled = itertools.count(1)
AGENT = "bench-agent"
# The handshake era Claude Code opens servers with (see the README); both sides of every ratio use it.
MODE = "legacy"
SERVE_FLAGS = ("--log-level", "warning")
# The PostgreSQL server measures make their own databases on (trust auth, as on every machine here),
# and the shared rate-limit storage a PostgreSQL gateway requires.
PG_SERVER = os.environ.get("QPU_BENCH_PG_SERVER", "postgresql://postgres@127.0.0.1:5432")
REDIS_STORAGE = os.environ.get("QPU_BENCH_REDIS_STORAGE", "async+redis://127.0.0.1:6379/0")


@dataclass(frozen=True, slots=True)
class GatewayFiles:
    """A database with one agent key, and the policy file a server of ours runs under."""

    db: Path
    policy: Path
    key: str
    url: str | None = None  # a PostgreSQL database instead of the SQLite file `db`

    @property
    def database(self) -> Database:
        return Database(url=self.url) if self.url else Database(path=self.db)

    @property
    def db_arg(self) -> str:
        """What `--db` takes for this database."""
        return self.url or str(self.db)

    def server_env(self) -> dict[str, str]:
        """The environment a server process on this database needs (a shared rate storage on PostgreSQL)."""
        if not self.url:
            return {}
        return {"QPU_GATEWAY_RATE_STORAGE": REDIS_STORAGE, "QPU_GATEWAY_DATA_DIR": str(self.db.parent)}


def _write_policy(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


async def gateway_files(
    directory: Path, policy_text: str, *, agent: str = AGENT, url: str | None = None
) -> GatewayFiles:
    """Create the database (migrations applied: a SQLite file in `directory`, or the PostgreSQL
    database at `url`), write the policy, and make a key with every scope."""
    db, policy = directory / "gateway.db", directory / "policy.toml"
    _write_policy(policy, policy_text)
    files = GatewayFiles(db=db, policy=policy, key="", url=url)
    store = await open_store(files.database)
    try:
        _, key = await create_key(store, agent=agent, project="default", scopes=frozenset(SCOPES))
    finally:
        await store.close()
    return GatewayFiles(db=db, policy=policy, key=key, url=url)


@contextmanager
def postgres_database(prefix: str = "qpg_bench") -> Iterator[str]:
    """A new, empty database on the local PostgreSQL server for the block (dropped after); its URL."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ours_python(module: str) -> list[str]:
    """`python -m module` for a server of ours, under cProfile when the run is profiled."""
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        return [sys.executable, "-m", module]
    out = Path(directory) / f"ours-{next(_profiled)}.prof"
    return [sys.executable, "-m", "cProfile", "-o", str(out), "-m", module]


def _files_args(files: GatewayFiles) -> list[str]:
    return ["--db", files.db_arg, "--policy", str(files.policy), *SERVE_FLAGS]


def cli_stdio_argv(files: GatewayFiles) -> list[str]:
    """`qpu-gateway serve --transport stdio`, exactly as mcp.json starts it."""
    return [*ours_python("qpu_gateway"), "serve", "--transport", "stdio", *_files_args(files)]


def bare_stdio_argv() -> list[str]:
    return [sys.executable, "-m", "bench.bare_server", "stdio"]


def key_env(files: GatewayFiles) -> dict[str, str]:
    return {"QPU_GATEWAY_KEY": files.key}


def stdio_params(argv: list[str], env: dict[str, str] | None = None) -> StdioServerParameters:
    return StdioServerParameters(command=argv[0], args=argv[1:], env=env or {}, cwd=str(REPO))


def gateway_params(files: GatewayFiles, *, noop: bool = False) -> StdioServerParameters:
    """Our server over stdio; with `noop` (or when phases are traced), the bench runner of it."""
    phases = os.environ.get(PHASES_ENV)
    if noop or phases:
        argv = [*ours_python("bench.gateway_server"), *_files_args(files)]
        return stdio_params(argv, {**key_env(files), **({PHASES_ENV: phases} if phases else {})})
    return stdio_params(cli_stdio_argv(files), key_env(files))


def bare_params() -> StdioServerParameters:
    return stdio_params(bare_stdio_argv())


@asynccontextmanager
async def stdio_client(params: StdioServerParameters) -> AsyncIterator[Client]:
    """A connected SDK client; its tool list is fetched once, as an agent's client does first."""
    async with Client(params, mode=MODE, read_timeout_seconds=600) as client:
        await client.list_tools()
        yield client


# -- HTTP ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class HttpServer:
    url: str
    pid: int


@contextmanager
def http_server(argv: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[HttpServer]:
    """Run a Streamable HTTP server process until the block ends; yields its /mcp URL once it accepts."""
    process = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(argv[1:3])} exited with {process.returncode} before listening")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(argv[1:3])} did not listen on port {port} within 60 s") from None
                time.sleep(0.05)
        yield HttpServer(url=f"http://127.0.0.1:{port}/mcp", pid=process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def gateway_http_argv(files: GatewayFiles, port: int) -> list[str]:
    """`qpu-gateway serve --transport http`; the bench runner of it when phases are traced."""
    if os.environ.get(PHASES_ENV):
        return [*ours_python("bench.gateway_server"), "--transport", "http", "--port", str(port), *_files_args(files)]
    return [
        *ours_python("qpu_gateway"),
        "serve",
        "--transport",
        "http",
        "--port",
        str(port),
        *_files_args(files),
    ]


def gateway_noop_http_argv(files: GatewayFiles, port: int) -> list[str]:
    """Our server over Streamable HTTP with the no-op tool added (bench/gateway_server.py)."""
    argv = [*ours_python("bench.gateway_server"), "--transport", "http", "--noop", "--port", str(port)]
    return [*argv, *_files_args(files)]


def bare_http_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "bench.bare_server", "http", "--port", str(port)]


@asynccontextmanager
async def http_client(url: str, key: str | None) -> AsyncIterator[Client]:
    """One client session over Streamable HTTP (its own connection pool), with the key as a bearer token."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=600)) as http,
        Client(streamable_http_client(url, http_client=http), mode=MODE, read_timeout_seconds=600) as client,
    ):
        await client.list_tools()
        yield client
