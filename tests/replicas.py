"""Several `qpu-gateway serve --transport http` replicas on one database, with HAProxy in front.

The database is one parameter, `db`: the value each replica gets as `--db` (a SQLite path or a
`postgresql://` URL), so the replica tests run unchanged on either; on PostgreSQL the replicas
count rate limits in the shared Redis unless a test names another storage.
Nothing here imitates the gateway: replicas are real subprocesses, the load balancer is Debian's
HAProxy started with a generated config (no systemd), Redis is a real `redis-server`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qpu_gateway.config import Database
from qpu_gateway.store import Store, open_store

from .databases import REDIS_STORAGE
from .support import free_port, gateway_cmd, set_up_database, stop_process, wait_listening


async def open_db(db: str) -> Store:
    """The store behind `db`, for a test to read what the replicas wrote (and to make keys)."""
    return await open_store(Database.parse(db))


def prepare(db: str) -> None:
    """Set the database up once, as `qpu-gateway init` would, before replicas serve it."""
    set_up_database(Database.parse(db))


@dataclass
class Replica:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def stop(self) -> None:
        stop_process(self.process)

    def wait(self) -> Replica:
        """Wait until it accepts connections."""
        wait_listening(self.process, self.port, what=f"replica on port {self.port} (log {self.log})")
        return self


def start_replica(db: str, policy: Path, log: Path, **env: str) -> Replica:
    """One `qpu-gateway serve --transport http` on a free loopback port (see `Replica.wait`)."""
    port = free_port()
    args = ["serve", "--transport", "http", "--port", str(port), "--db", db, "--policy", str(policy)]
    with log.open("ab") as out:
        process = subprocess.Popen(
            gateway_cmd(*args, "--log-level", "info"),
            env={**os.environ, "QPU_GATEWAY_LEASE_S": "3", **env},
            stdout=subprocess.DEVNULL,
            stderr=out,
        )
    return Replica(port, process, log)


@contextmanager
def replicas(
    db: str, folder: Path, count: int = 3, *, policies: list[Path] | None = None, **env: str
) -> Iterator[list[Replica]]:
    """`count` replicas of one gateway on `db`, each with its own log in `folder`; all stopped at exit.

    `policies` gives each replica its own policy file (default: `folder/policy.toml` for all)."""
    prepare(db)
    if Database.parse(db).is_postgres:
        env.setdefault("QPU_GATEWAY_RATE_STORAGE", REDIS_STORAGE)  # a PostgreSQL gateway needs a shared one
    started: list[Replica] = []
    try:
        for index in range(count):
            policy = policies[index] if policies else folder / "policy.toml"
            started.append(start_replica(db, policy, folder / f"replica-{index}.log", **env))
        for replica in started:  # started together, waited for together: they import in parallel
            replica.wait()
        yield started
    finally:
        for replica in started:
            replica.stop()


# The recipe the README gives, with the ports filled in. Sessions of the 2025-11-25 era live in the
# replica that opened them (the SDK keeps them in process), so a request carrying Mcp-Session-Id must
# go back there: the table learns each session from the response that created it. Requests of the
# 2026-07-28 era carry no session and may go anywhere.
HAPROXY_CONFIG = """\
global
    maxconn 1024

defaults
    mode http
    timeout connect 5s
    # Long enough for a wait_for_job and for the SSE streams that carry notifications.
    timeout client 1h
    timeout server 1h
    option redispatch

frontend mcp
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance roundrobin
    stick-table type string len 64 size 1m expire 30m
    stick on req.hdr(mcp-session-id)
    stick store-response res.hdr(mcp-session-id)
{servers}"""


@dataclass
class Balancer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"


def haproxy_config(port: int, backends: list[int], *, sticky: bool = True) -> str:
    servers = "".join(f"    server replica{i} 127.0.0.1:{p}\n" for i, p in enumerate(backends))
    text = HAPROXY_CONFIG.format(port=port, servers=servers)
    if not sticky:
        text = "".join(line for line in text.splitlines(keepends=True) if "stick" not in line)
    return text


@contextmanager
def haproxy(folder: Path, backends: list[int], *, sticky: bool = True) -> Iterator[Balancer]:
    """HAProxy in the foreground (`-db`, no systemd) on a free port, in front of `backends`."""
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    port = free_port()
    config = folder / ("haproxy.cfg" if sticky else "haproxy-unsticky.cfg")
    config.write_text(haproxy_config(port, backends, sticky=sticky), encoding="utf-8")
    checked = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=sys.stderr)
    try:
        wait_listening(process, port, what="haproxy")
        yield Balancer(port, process)
    finally:
        stop_process(process)


@contextmanager
def own_redis() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis of the test's own on a free port (never the shared one on 6379), with no persistence."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_listening(process, port, what="redis-server")
        yield f"async+redis://127.0.0.1:{port}", process
    finally:
        stop_process(process)


def restart_redis(uri: str) -> subprocess.Popen[bytes]:
    """Start Redis again on the port of `uri` (the caller stops it)."""
    port = int(uri.rsplit(":", 1)[1])
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    wait_listening(process, port, what="redis-server")
    return process
