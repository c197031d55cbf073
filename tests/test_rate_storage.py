"""The SQLite rate-limit storage under limits' own strategies, on a real file, in one process and across two."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from limits import RateLimitItem, parse
from limits.aio.strategies import MovingWindowRateLimiter, RateLimiter, SlidingWindowCounterRateLimiter
from limits.errors import ConfigurationError
from limits.storage import storage_from_string

from qpu_gateway.store.rate_storage import SqliteRateStorage, storage_uri

pytestmark = pytest.mark.anyio

STRATEGIES = {"moving-window": MovingWindowRateLimiter, "sliding-window-counter": SlidingWindowCounterRateLimiter}

# One gateway process: connect before the agreed instant, then fire 50 hits at once.
PROCESS = """
import sys, time
import anyio
from limits import parse
from limits.aio.strategies import STRATEGIES
from qpu_gateway.store.rate_storage import SqliteRateStorage

async def main(uri: str, strategy: str, start_at: float) -> None:
    storage = SqliteRateStorage(uri)
    limiter = STRATEGIES[strategy](storage)
    item = parse("30/minute")
    assert await storage.check()
    await anyio.sleep(max(0.0, start_at - time.time()))
    admitted = 0

    async def hit() -> None:
        nonlocal admitted
        if await limiter.hit(item, "agent"):
            admitted += 1

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(hit)
    await storage.aclose()
    print(admitted)

anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
"""


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


@pytest.fixture
async def storage(db_path: Path) -> AsyncIterator[SqliteRateStorage]:
    storage = SqliteRateStorage(storage_uri(db_path))
    yield storage
    await storage.aclose()


@pytest.fixture(params=list(STRATEGIES))
def limiter(request: pytest.FixtureRequest, storage: SqliteRateStorage) -> RateLimiter:
    strategy: type[RateLimiter] = STRATEGIES[request.param]
    return strategy(storage)


def start_clear_of_window_edge(item: RateLimitItem, room_s: float) -> float:
    """An instant soon, at least `room_s` before the end of the item's clock-aligned window.

    The sliding window counter's windows are aligned on multiples of the period: a burst that
    straddles an edge is weighted, not counted, so exact counts need the burst inside one window.
    """
    period = item.get_expiry()
    now = time.time()
    left = period - now % period
    return now if left > room_s else now + left + 0.01


async def clear_of_window_edge(item: RateLimitItem, room_s: float) -> None:
    await anyio.sleep(max(0.0, start_clear_of_window_edge(item, room_s) - time.time()))


async def test_storage_from_string_builds_the_sqlite_storage_from_its_uri(db_path: Path) -> None:
    storage = storage_from_string(f"async+qpu-sqlite://{db_path}")
    assert isinstance(storage, SqliteRateStorage)
    assert storage.path == db_path
    assert await storage.check()
    await storage.aclose()
    assert await anyio.Path(db_path).exists()


@pytest.mark.parametrize("uri", ["async+qpu-sqlite://gateway.db", "async+qpu-sqlite://host/tmp/gateway.db"])
async def test_a_uri_without_an_absolute_path_is_refused_as_configuration(uri: str) -> None:
    with pytest.raises(ConfigurationError, match="absolute path after three slashes"):
        SqliteRateStorage(uri)


async def test_a_path_with_spaces_survives_the_uri(tmp_path: Path) -> None:
    path = tmp_path / "a dir" / "gate way.db"
    storage = storage_from_string(storage_uri(path))
    assert isinstance(storage, SqliteRateStorage)
    assert storage.path == path
    assert await storage.check()
    await storage.aclose()
    assert await anyio.Path(path).exists()


async def test_five_per_second_admits_exactly_five_of_eight_sequential_hits(limiter: RateLimiter) -> None:
    item = parse("5/second")
    await clear_of_window_edge(item, 0.3)
    admitted = [await limiter.hit(item, "agent:alice") for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3
    assert not await limiter.test(item, "agent:alice")


async def test_window_stats_report_what_remains_and_when_room_comes_back(limiter: RateLimiter) -> None:
    item = parse("5/second")
    await clear_of_window_edge(item, 0.3)
    fresh = await limiter.get_window_stats(item, "agent:alice")
    assert fresh.remaining == 5

    before = time.time()
    for _ in range(3):
        assert await limiter.hit(item, "agent:alice")
    stats = await limiter.get_window_stats(item, "agent:alice")
    assert stats.remaining == 2
    assert before < stats.reset_time <= time.time() + 1


async def test_hits_are_admitted_again_once_the_window_has_passed(limiter: RateLimiter) -> None:
    item = parse("1/second")
    await clear_of_window_edge(item, 0.3)
    assert await limiter.hit(item, "agent:alice")
    assert not await limiter.hit(item, "agent:alice")
    await anyio.sleep(1.1)
    assert await limiter.hit(item, "agent:alice")


async def test_cost_counts_every_shot(limiter: RateLimiter) -> None:
    item = parse("100/minute")
    await clear_of_window_edge(item, 1)
    assert await limiter.hit(item, "backend:aer", cost=60)
    assert not await limiter.hit(item, "backend:aer", cost=60)
    assert await limiter.hit(item, "backend:aer", cost=40)
    assert not await limiter.hit(item, "backend:aer", cost=1)
    assert (await limiter.get_window_stats(item, "backend:aer")).remaining == 0
    assert not await limiter.hit(item, "backend:ibm", cost=101), "a cost above the whole limit never fits"


async def test_different_keys_are_counted_apart(limiter: RateLimiter) -> None:
    item = parse("2/second")
    await clear_of_window_edge(item, 0.3)
    for key in ("agent:alice", "agent:bob", "project:p1"):
        assert [await limiter.hit(item, key) for _ in range(3)] == [True, True, False]
    assert (await limiter.get_window_stats(parse("2/minute"), "agent:alice")).remaining == 2


async def test_clearing_a_key_gives_its_whole_allowance_back(limiter: RateLimiter) -> None:
    item = parse("2/minute")
    await clear_of_window_edge(item, 1)
    assert [await limiter.hit(item, "agent:alice") for _ in range(3)] == [True, True, False]
    await limiter.clear(item, "agent:alice")
    assert (await limiter.get_window_stats(item, "agent:alice")).remaining == 2
    assert await limiter.hit(item, "agent:alice")


async def test_several_hits_in_one_call_stop_at_the_first_without_room(storage: SqliteRateStorage) -> None:
    """`acquire_entries` does what `acquire_entry` of each in turn would, stopping at the first refusal,
    and the moving window's own reads see exactly the hits it recorded."""
    minute, second = parse("3/minute"), parse("2/second")
    await clear_of_window_edge(second, 0.5)
    limiter = MovingWindowRateLimiter(storage)
    burst, calls = minute.key_for("submit", "agent:alice"), second.key_for("any", "agent:alice")
    both = [(burst, 3, 60, 1), (calls, 2, 1, 1)]

    assert await storage.acquire_entries(both) == 2
    assert await storage.acquire_entries(both) == 2
    # The per-second rule is spent: the first rule's hit stays counted, as one by one it would.
    assert await storage.acquire_entries(both) == 1
    assert (await limiter.get_window_stats(minute, "submit", "agent:alice")).remaining == 0
    assert (await limiter.get_window_stats(second, "any", "agent:alice")).remaining == 0
    # The first rule is spent: nothing is counted, the second rule's window included.
    await anyio.sleep(1.1)
    assert await storage.acquire_entries(both) == 0
    assert (await limiter.get_window_stats(second, "any", "agent:alice")).remaining == 2
    # A cost above a limit never fits; costs count as many as they are.
    assert await storage.acquire_entries([(calls, 2, 1, 2), (burst + "-2", 3, 60, 4)]) == 1
    assert not await limiter.hit(second, "any", "agent:alice")


async def test_several_hits_need_a_key_each_and_a_positive_cost(storage: SqliteRateStorage) -> None:
    with pytest.raises(ValueError, match="key of its own"):
        await storage.acquire_entries([("k", 2, 60, 1), ("k", 5, 1, 1)])
    with pytest.raises(ValueError, match="positive cost"):
        await storage.acquire_entries([("k", 2, 60, 0)])
    assert await storage.acquire_entries([]) == 0


async def test_several_hits_at_once_from_many_tasks_admit_exactly_the_limit(storage: SqliteRateStorage) -> None:
    """Check and add stay one step under contention: 40 concurrent two-rule hits at 15 per minute on
    the second rule count exactly 15 on both rules' keys (the first rule, 100 per minute, counts every
    call that reached the second: the same 15, as no call was refused by the first)."""
    wide, narrow = parse("100/minute"), parse("15/minute")
    entries = [(wide.key_for("w"), 100, 60, 1), (narrow.key_for("n"), 15, 60, 1)]
    outcomes: list[int] = []

    async def call() -> None:
        outcomes.append(await storage.acquire_entries(entries))

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(call)
    assert sorted(outcomes).count(2) == 15 and sorted(outcomes).count(1) == 25
    limiter = MovingWindowRateLimiter(storage)
    assert (await limiter.get_window_stats(narrow, "n")).remaining == 0
    assert (await limiter.get_window_stats(wide, "w")).remaining == 60


async def test_reset_forgets_every_limit_in_the_file(storage: SqliteRateStorage) -> None:
    item = parse("1/minute")
    moving, sliding = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)
    assert await moving.hit(item, "agent:alice")
    assert await sliding.hit(item, "agent:bob")
    assert await storage.reset() == 2
    assert await moving.hit(item, "agent:alice")
    assert await sliding.hit(item, "agent:bob")


async def test_expired_hits_and_counters_are_pruned(storage: SqliteRateStorage, db_path: Path) -> None:
    item = parse("3/second")
    moving, sliding = MovingWindowRateLimiter(storage), SlidingWindowCounterRateLimiter(storage)
    for key in ("agent:alice", "agent:bob", "agent:dave"):
        assert await moving.hit(item, key)
        assert await sliding.hit(item, key)
    # A sliding window's counter lives until the end of the next window: at most two periods.
    await anyio.sleep(2.1)
    assert await moving.hit(item, "agent:alice")  # prunes alice's own expired hit
    assert await sliding.hit(item, "agent:carol")
    assert _hit_keys(db_path) == sorted(item.key_for(f"agent:{who}") for who in ("alice", "bob", "dave"))

    # Keys nobody hits any more are swept with the whole table, at most once a minute.
    storage._next_sweep = time.time()  # as if the minute since the last sweep had passed
    assert await moving.hit(item, "agent:carol")
    with closing(sqlite3.connect(db_path)) as db:
        counters = db.execute("SELECT key FROM rate_counters").fetchall()
    assert _hit_keys(db_path) == sorted(item.key_for(f"agent:{who}") for who in ("alice", "carol"))
    assert [key.rsplit("/", 1)[0] for (key,) in counters] == [item.key_for("agent:carol")]


async def test_hits_of_the_first_versions_table_are_moved_over(db_path: Path) -> None:
    item = parse("2/minute")
    with closing(sqlite3.connect(db_path)) as db:
        db.execute("CREATE TABLE rate_entries (key TEXT, at REAL, expires_at REAL, amount INTEGER)")
        now, key = time.time(), item.key_for("agent:alice")
        db.executemany("INSERT INTO rate_entries VALUES (?, ?, ?, 1)", [(key, now, now + 60)] * 2)
        db.commit()
    storage = SqliteRateStorage(storage_uri(db_path))
    try:
        # Both hits were made at one instant and stay two hits; the window is still full.
        assert not await MovingWindowRateLimiter(storage).hit(item, "agent:alice")
        assert await MovingWindowRateLimiter(storage).hit(item, "agent:bob")
    finally:
        await storage.aclose()
    with closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT name FROM sqlite_master WHERE name = 'rate_entries'").fetchall() == []


def _hit_keys(db_path: Path) -> list[str]:
    with closing(sqlite3.connect(db_path)) as db:
        return sorted(key for (key,) in db.execute("SELECT DISTINCT key FROM rate_hits"))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
async def test_two_processes_firing_fifty_concurrent_hits_each_admit_exactly_thirty_in_total(
    strategy: str, db_path: Path
) -> None:
    uri = storage_uri(db_path)
    item = parse("30/minute")
    # Both processes start at one instant, after their imports, well inside one minute window.
    start_at = start_clear_of_window_edge(item, 5) + 1.5
    outputs: list[str] = []

    async def gateway_process() -> None:
        done = await anyio.run_process([sys.executable, "-c", PROCESS, uri, strategy, repr(start_at)], check=True)
        outputs.append(done.stdout.decode())

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(gateway_process)
            tg.start_soon(gateway_process)

    admitted = [int(out) for out in outputs]
    assert sum(admitted) == 30, admitted
    storage = SqliteRateStorage(uri)
    try:
        limiter = STRATEGIES[strategy](storage)
        stats = await limiter.get_window_stats(item, "agent")
        assert stats.remaining == 0
        assert not await limiter.hit(item, "agent")
    finally:
        await storage.aclose()
