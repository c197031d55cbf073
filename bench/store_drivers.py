"""psycopg 3 (pipeline mode) against asyncpg, on the PostgreSQL store's own transactions.

The same `PostgresStore`, with the same SQL, runs over two connectors: the gateway's psycopg one
(`server/store/pg_psycopg.py`: a pool, every transaction in pipeline mode) and an asyncpg one
written here (asyncpg's pool; it has no pipelining, so each statement waits for its answer).
Measured, in rounds that alternate the drivers so drift on a shared machine hits both alike, on
databases of their own on the local server:

- admit: `store.admit` of a new job (advisory locks, the facts, job + ledger + audit row), one at a time;
- admit x8: eight admissions at once from one process (pool contention, lock queues), jobs/s;
- claim: `store.claim_many(limit=1)` with a running-cap check, as a worker claims, one at a time.

Each straight to the local server, and again through a loopback proxy that holds every chunk half
a millisecond each way (1 ms round trips: a database on another machine, which is what replicas
have), since round trips are what pipelining saves and loopback makes them nearly free.

asyncpg is the baseline; psycopg's figure over it is the ratio (below 1 = psycopg is faster for
latency). asyncpg is a bench extra (`pip install -e '.[bench]'`), not a dependency of the gateway.

    python -m bench.store_drivers [--quick] [--rtt-ms 1]   (or: python -m bench --only store_admit,...)
"""

from __future__ import annotations

import argparse
import re
import secrets
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio

from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary
from qpu_gateway.jobs.states import JobState
from qpu_gateway.store import StoreError
from qpu_gateway.store.pg_connector import UNAVAILABLE, UNAVAILABLE_RETRY_S, Params, Retry, Statement
from qpu_gateway.store.pg_psycopg import PsycopgConnector
from qpu_gateway.store.postgres import PostgresStore
from qpu_gateway.store.records import AuditEntry, NewJob

NAMES = ("store_admit", "store_admit_x8", "store_claim")
# The gateway's driver, the same without pipeline mode (what the pipeline buys), and the baseline.
DRIVERS = ("psycopg", "psycopg_plain", "asyncpg")
SERVER = "postgresql://postgres@127.0.0.1:5432"
_PLACEHOLDER = re.compile(r"%s")
BELL = 'OPENQASM 2.0;\ninclude "qelib1.inc";\nqreg q[2];\ncreg c[2];\nh q[0];\ncx q[0], q[1];\nmeasure q -> c;\n'


def _dollar(sql: str) -> str:
    """`%s` placeholders as asyncpg's `$1, $2, ...` (the store's SQL has no other `%`)."""
    count = iter(range(1, 10_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(count)}", sql)


class _AsyncpgTx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def run(self, sql: str, params: Params = ()) -> None:
        await self._conn.execute(_dollar(sql), *params)

    async def one(self, sql: str, params: Params = ()) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(_dollar(sql), *params)
        return dict(row) if row is not None else None

    async def all(self, sql: str, params: Params = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._conn.fetch(_dollar(sql), *params)]

    async def many(self, statements: Sequence[Statement]) -> list[list[dict[str, Any]]]:
        return [await self.all(sql, params) for sql, params in statements]

    async def script(self, sql: str) -> None:
        await self._conn.execute(sql)


class AsyncpgConnector:
    """The driver seam (`server/store/pg_connector.py`) over asyncpg, for this comparison only."""

    name = "asyncpg"

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, size: int = 4) -> AsyncpgConnector:
        try:
            import asyncpg
        except ImportError:
            raise RuntimeError("asyncpg is the baseline here: pip install -c requirements.lock -e '.[bench]'") from None

        return cls(await asyncpg.create_pool(url, min_size=1, max_size=size))

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        import asyncpg

        try:
            yield
        except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
            raise Retry(str(exc)) from None
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise StoreError(UNAVAILABLE, retry_after_s=UNAVAILABLE_RETRY_S) from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_AsyncpgTx]:
        async with self._errors(), self._pool.acquire() as conn, conn.transaction():
            yield _AsyncpgTx(conn)

    @asynccontextmanager
    async def scripting(self) -> AsyncIterator[_AsyncpgTx]:
        async with self.transaction() as tx:
            yield tx

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[_AsyncpgTx]:
        async with self._errors(), self._pool.acquire() as conn:
            yield _AsyncpgTx(conn)

    async def listen(
        self, channel: str, on_notify: Callable[[str], Awaitable[None]], on_connected: Callable[[], Awaitable[None]]
    ) -> None:
        send, receive = anyio.create_memory_object_stream[str](1000)
        async with self._pool.acquire() as conn:
            await conn.add_listener(channel, lambda *args: send.send_nowait(args[-1]))
            await on_connected()
            async for payload in receive:
                await on_notify(payload)


def _job(n: int, agent: str) -> NewJob:
    return NewJob(
        id=f"job_{secrets.token_hex(8)}",
        agent=agent,
        project="bench",
        key_id="k",
        name=None,
        backend="aer/simulator",
        shots=100,
        circuits=(BELL,),
        qubits=2,
        depth=3,
        two_qubit_gates=1,
        fingerprint=f"{n:064x}",
        estimate_micro_usd=1_000,
        state=JobState.QUEUED,
    )


async def _admit(store: PostgresStore, n: int, agent: str) -> None:
    job = _job(n, agent)
    entry = AuditEntry(tool="submit_job", decision="ok", agent=agent, project="bench", job_id=job.id)
    outcome = await store.admit(job, entry, time.time(), loop_window_s=60.0, decide=lambda facts: None)
    assert not isinstance(outcome, Exception)


async def _admit_many(store: PostgresStore, first: int, count: int, agent: str) -> None:
    for n in range(first, first + count):
        await _admit(store, n, agent)


async def _claim(store: PostgresStore) -> None:
    jobs = await store.claim_many(["aer"], [], "bench-worker", 30.0, time.time(), lambda job, a, p: True, limit=1)
    assert len(jobs) == 1, "the queue ran dry"


def _psql_admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(f"{SERVER}/postgres", autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@asynccontextmanager
async def _delaying_proxy(rtt_ms: float) -> AsyncIterator[str]:
    """A loopback TCP proxy to the local server that holds each chunk rtt/2 in each direction: a
    database on another machine, as replicas have it, without touching the shared loopback."""
    import asyncio

    half = rtt_ms / 2000

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                await asyncio.sleep(half)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def serve(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", 5432)
        await asyncio.gather(pipe(client_r, server_w), pipe(server_r, client_w))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        server.close()


async def _stores(via: str) -> tuple[dict[str, PostgresStore], list[str]]:
    names = {driver: f"qpg_bench_{driver}_{secrets.token_hex(4)}" for driver in DRIVERS}
    for name in names.values():
        _psql_admin(f'CREATE DATABASE "{name}"')
    psy = PsycopgConnector(f"{via}/{names['psycopg']}", connect_timeout_s=5.0)
    await psy.open()
    plain = PsycopgConnector(f"{via}/{names['psycopg_plain']}", connect_timeout_s=5.0, pipeline=False)
    await plain.open()
    apg = await AsyncpgConnector.open(f"{via}/{names['asyncpg']}")
    stores = {
        "psycopg": PostgresStore(psy, ""),
        "psycopg_plain": PostgresStore(plain, ""),
        "asyncpg": PostgresStore(apg, ""),
    }
    for store in stores.values():
        await store.migrate()
    return stores, list(names.values())


async def measure(
    quick: bool, log: Callable[[str], None] = print, rtt_ms: float = 0.0
) -> dict[str, dict[str, list[float]]]:
    """Samples per measure and driver: ms per transaction (admit, claim) and jobs/s (admit x8),
    straight to the local server or, with `rtt_ms`, through a proxy adding that round-trip time."""
    if rtt_ms > 0:
        async with _delaying_proxy(rtt_ms) as via:
            return await _measure(quick, log, via)
    return await _measure(quick, log, SERVER)


async def _measure(quick: bool, log: Callable[[str], None], via: str) -> dict[str, dict[str, list[float]]]:
    stores, databases = await _stores(via)
    rounds, per_round = (3, 30) if quick else (6, 120)
    samples: dict[str, dict[str, list[float]]] = {m: {d: [] for d in DRIVERS} for m in NAMES}
    n = 0
    try:
        for store in stores.values():  # warm both: pools filled, statements prepared
            for _ in range(20):
                n += 1
                await _admit(store, n, "warm")
        for r in range(rounds):
            shift = r % len(stores)  # each driver goes first, middle and last in turn
            order = list(stores.items())[shift:] + list(stores.items())[:shift]
            for driver, store in order:
                for _ in range(per_round):
                    n += 1
                    began = time.perf_counter()
                    await _admit(store, n, f"agent{n % 4}")
                    samples["store_admit"][driver].append((time.perf_counter() - began) * 1000)
                began = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for i in range(8):  # eight clients, each admitting one job after another
                        tg.start_soon(_admit_many, store, n + i * per_round, per_round // 8, f"agent{i % 4}")
                n += 8 * per_round
                samples["store_admit_x8"][driver].append(8 * (per_round // 8) / (time.perf_counter() - began))
                for _ in range(per_round):
                    began = time.perf_counter()
                    await _claim(store)
                    samples["store_claim"][driver].append((time.perf_counter() - began) * 1000)
            log(
                f"store drivers round {r + 1}/{rounds}: admit psycopg "
                f"{statistics.median(samples['store_admit']['psycopg']):.2f} ms, asyncpg "
                f"{statistics.median(samples['store_admit']['asyncpg']):.2f} ms"
            )
    finally:
        for store in stores.values():
            await store.close()
        for name in databases:
            _psql_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return samples


_LABELS = {
    "store_admit": ("PostgreSQL store: admit, one at a time", "ms", Target("<=", 1.0), True),
    "store_admit_x8": ("PostgreSQL store: admit, 8 at once", "jobs/s", Target(">=", 1.0), False),
    "store_claim": ("PostgreSQL store: claim (running caps checked)", "ms", Target("<=", 1.0), True),
}


# Loopback, and a database one millisecond away (replicas on other machines than the database).
RTTS_MS = (0.0, 1.0)


async def run(ctx: Context, names: set[str]) -> list[Row]:
    rows = []
    for rtt_ms in RTTS_MS:
        samples = await measure(ctx.quick, ctx.log, rtt_ms)
        rows += _rows(samples, names, "" if not rtt_ms else f", {rtt_ms:g} ms RTT")
    return rows


def _rows(samples: dict[str, dict[str, list[float]]], names: set[str], where: str) -> list[Row]:
    rows = []
    for name in NAMES:
        if name not in names:
            continue
        label, unit, target, latency = _LABELS[name]
        rows.append(
            Row(
                label + where,
                unit,
                Summary.of(samples[name]["asyncpg"], latency=latency),
                Summary.of(samples[name]["psycopg"], latency=latency),
                target,
                "asyncpg 0.32 (no pipeline)",
                notes=[
                    "ours: psycopg 3.3, pipeline mode; the same PostgresStore and SQL on both",
                    f"psycopg without pipeline mode: {statistics.median(samples[name]['psycopg_plain']):.3f} {unit}",
                ],
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.store_drivers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="add this round-trip time (a remote database)")
    args = parser.parse_args()
    samples = anyio.run(measure, args.quick, print, args.rtt_ms)
    print(f"{'measure':50} {'asyncpg':>10} {'psycopg':>10} {'ratio':>7} {'no pipe':>10} {'ratio':>7}")
    for name in NAMES:
        label, unit, _, _ = _LABELS[name]
        base, ours, plain = (statistics.median(samples[name][d]) for d in ("asyncpg", "psycopg", "psycopg_plain"))
        line = f"{label + ' (' + unit + ')':50} {base:10.3f} {ours:10.3f} {ours / base:6.2f}x"
        print(line + f" {plain:10.3f} {plain / base:6.2f}x")


if __name__ == "__main__":
    main()
