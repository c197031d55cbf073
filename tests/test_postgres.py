"""What is PostgreSQL's own: database URLs and their passwords, init and serve on a URL, job changes
pushed by LISTEN/NOTIFY, and a server that goes down and comes back under a running gateway.

The restart test runs a throwaway PostgreSQL server of its own (initdb into a temporary folder, on
a free port), never the shared one on 5432 that other tests and engineers use at the same time.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import psycopg
import pytest

from qpu_gateway.config import Config, Database
from qpu_gateway.jobs.ratelimit import RateStorageRefused, storage_uri_for
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.store import StoreError, open_store, store_initialised

from .databases import REDIS_STORAGE, create_postgres, drop_postgres, query
from .support import BELL2, body, eventually, free_port, gateway_cmd, in_memory, new_key

pytestmark = pytest.mark.anyio

PG_BIN = Path("/usr/lib/postgresql/15/bin")
SECRET = "s3cret-Pa55word"
# A call waits this long for a connection to a server that is down before it is answered unavailable.
QUICK = {"QPU_GATEWAY_BUSY_TIMEOUT_S": "1"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        gateway_cmd(*args), env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120, check=False
    )


# -- locations -------------------------------------------------------------------------------------


def test_a_database_is_a_path_a_sqlite_url_or_a_postgresql_url() -> None:
    assert Database.parse("/var/lib/g.db") == Database(path=Path("/var/lib/g.db"))
    assert Database.parse("sqlite:///var/lib/my%20g.db") == Database(path=Path("/var/lib/my g.db"))
    pg = Database.parse(f"postgresql://gw:{SECRET}@db.internal:5433/gateway")
    assert pg.is_postgres and pg.url == f"postgresql://gw:{SECRET}@db.internal:5433/gateway"
    assert SECRET not in str(pg) and SECRET not in repr(pg) and "[redacted]" in str(pg)
    assert pg.default_data_dir().name == "db.internal-5433-gateway"
    with pytest.raises(ValueError, match="name the database"):
        Database.parse("postgresql://db.internal:5432")
    with pytest.raises(ValueError, match="unsupported database URL scheme 'mysql'"):
        Database.parse("mysql://db/gateway")


def test_a_postgresql_store_keeps_its_files_in_a_data_directory_of_its_own(tmp_path: Path) -> None:
    os.environ.pop("QPU_GATEWAY_DATA_DIR", None)
    config = Config.resolve(db="postgresql://127.0.0.1/gateway_a")
    other = Config.resolve(db="postgresql://127.0.0.1/gateway_b")
    assert config.files != other.files  # two databases never share a policy or a local key
    assert config.policy_path == config.files / "policy.toml"
    chosen = Config.resolve(db="postgresql://127.0.0.1/gateway_a", data_dir=str(tmp_path))
    assert (chosen.files, chosen.policy_path) == (tmp_path, tmp_path / "policy.toml")
    sqlite = Config.resolve(db=str(tmp_path / "g.db"))
    assert sqlite.files == tmp_path  # SQLite keeps them beside the file, as before


def test_a_password_in_the_database_url_never_reaches_a_log_line_or_an_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql://gw:{SECRET}@127.0.0.1:{port}/gateway"
    refused = run_cli("keys", "list", "--db", url, env=QUICK)
    served = run_cli("serve", "--transport", "stdio", "--db", url, "--data-dir", str(tmp_path), env=QUICK)
    pathed = run_cli("paths", "--db", url, "--data-dir", str(tmp_path), env=QUICK)
    for done in (refused, served, pathed):
        assert SECRET not in done.stdout + done.stderr
    assert refused.returncode == 1 and "unavailable" in refused.stderr
    assert served.returncode == 1 and '"level": "error"' in served.stderr and "Traceback" not in served.stderr
    assert pathed.returncode == 0 and "unreachable" in pathed.stdout and "[redacted]" in pathed.stdout


# -- init and serve on a URL ---------------------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_postgres()
    yield url
    drop_postgres(url)


def test_init_on_a_postgresql_url_creates_the_database_migrates_it_and_makes_the_local_key(tmp_path: Path) -> None:
    url = create_postgres()
    drop_postgres(url)  # a name nobody has: init creates the database itself
    try:
        first = run_cli("init", "--db", url, "--data-dir", str(tmp_path))
        assert first.returncode == 0, first.stderr
        assert "(created)" in first.stdout
        assert (tmp_path / "local.key").stat().st_mode & 0o777 == 0o600
        assert store_initialised(Database(url=url))
        assert query(Database(url=url), "SELECT agent FROM keys") == [("local",)]
        again = run_cli("init", "--db", url, "--data-dir", str(tmp_path))
        assert again.returncode == 0 and "Already initialised" in again.stdout
        verified = run_cli("audit", "verify", "--db", url)
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        drop_postgres(url)


def test_serve_refuses_an_uninitialised_database_and_one_without_shared_rate_limits(
    pg_url: str, tmp_path: Path
) -> None:
    empty = run_cli("serve", "--transport", "stdio", "--db", pg_url, "--data-dir", str(tmp_path))
    assert empty.returncode == 1 and "qpu-gateway init" in empty.stderr
    assert run_cli("init", "--db", pg_url, "--data-dir", str(tmp_path)).returncode == 0
    unset = run_cli("serve", "--transport", "stdio", "--db", pg_url, "--data-dir", str(tmp_path))
    assert unset.returncode == 1 and "QPU_GATEWAY_RATE_STORAGE=async+redis://" in unset.stderr
    for local in ("memory://", "async+memory://", "async+qpu-sqlite:///var/lib/rates.db"):
        config = Config.resolve(db=pg_url, data_dir=str(tmp_path), rate_storage=local)
        with pytest.raises(RateStorageRefused, match="local to one machine"):
            storage_uri_for(config)
    shared = Config.resolve(db=pg_url, data_dir=str(tmp_path), rate_storage=REDIS_STORAGE)
    assert storage_uri_for(shared) == REDIS_STORAGE


# -- job changes across processes ---------------------------------------------------------------------


@pytest.mark.parametrize("db_backend", ["postgresql"])
async def test_a_job_finished_by_another_process_reaches_a_waiter_here_by_notification(
    config: Config, alice_key: str
) -> None:
    """The waiting gateway runs no workers and would poll only once an hour: the change can only
    come by LISTEN/NOTIFY."""
    watcher = Gateway(Config(**{**config.__dict__, "poll_interval_s": 3600.0}))
    runner = Gateway(config)
    async with watcher.running(workers=False), in_memory(watcher, alice_key) as client:
        submitted = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100}))
        waiting: dict[str, object] = {}

        async def wait() -> None:
            done = await client.call_tool("wait_for_job", {"job_id": submitted["job_id"], "timeout_s": 60})
            waiting.update(body(done))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await anyio.sleep(0.3)  # the waiter is waiting before anyone runs the job
            async with runner.running():
                await eventually(lambda: _has(waiting), within_s=60)
    assert waiting["state"] == "succeeded"


async def _has(found: dict[str, object]) -> bool:
    return bool(found)


# -- the server goes down and comes back ----------------------------------------------------------------


@dataclass
class Throwaway:
    """A PostgreSQL server of this test's own, in a temporary folder, on a free loopback port."""

    data: Path
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/gateway"

    def ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data / "db"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.ctl("-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def stop(self) -> None:
        self.ctl("-m", "fast", "-w", "stop")


@pytest.fixture
def throwaway() -> Iterator[Throwaway]:
    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15's server binaries are not installed")
    folder = Path(tempfile.mkdtemp(prefix="qpg-throwaway-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: the server runs as the postgres user
        account = pwd.getpwnam("postgres")
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = Throwaway(folder, free_port(), as_user)
    subprocess.run(
        [*as_user, str(PG_BIN / "initdb"), "-D", str(folder / "db"), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    server.start()
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{server.port}/postgres", autocommit=True) as conn:
        conn.execute("CREATE DATABASE gateway")
    try:
        yield server
    finally:
        subprocess.run(
            [*as_user, str(PG_BIN / "pg_ctl"), "-D", str(folder / "db"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        shutil.rmtree(folder, ignore_errors=True)


async def test_calls_answer_unavailable_while_postgresql_is_down_and_work_again_once_it_is_back(
    throwaway: Throwaway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QPU_GATEWAY_BUSY_TIMEOUT_S", "1")
    (tmp_path / "policy.toml").write_text('[defaults]\nallowed_backends = ["aer/*"]\n', encoding="utf-8")
    database = Database(url=throwaway.url)
    config = Config(
        database=database,
        policy_path=tmp_path / "policy.toml",
        data_dir=tmp_path,
        lease_s=3.0,
        poll_interval_s=0.1,
        approval_sweep_s=0.2,
        rate_storage=REDIS_STORAGE,
    )
    key = await new_key(database, "alice")
    gateway = Gateway(config)
    async with gateway.running(), in_memory(gateway, key) as client:
        before = body(await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100}))
        assert (await client.call_tool("wait_for_job", {"job_id": before["job_id"]})).structured_content[
            "state"
        ] == "succeeded"

        await anyio.to_thread.run_sync(throwaway.stop)
        down = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100})
        listing = await client.call_tool("list_jobs", {})
        for answer in (down, listing):
            refused = body(answer)
            assert answer.is_error and refused["code"] == "unavailable", refused
            assert refused["retry_after_s"] > 0
            assert "Traceback" not in refused["message"] and "127.0.0.1" not in refused["message"]

        await anyio.to_thread.run_sync(throwaway.start)

        async def submits() -> bool:
            answer = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 100})
            if answer.is_error:
                assert body(answer)["code"] == "unavailable"
                return False
            after.update(body(answer))
            return True

        after: dict[str, str] = {}
        await eventually(submits, within_s=60, every=0.5)
        done = await client.call_tool("wait_for_job", {"job_id": after["job_id"], "timeout_s": 60})
        assert done.structured_content["state"] == "succeeded"  # the workers and the listener are back
    # The refused calls' audit rows were set aside while it was down and written once it was back:
    # one chain, and the operator's verify accepts it.
    refusals = query(database, "SELECT count(*) FROM audit WHERE error_code = 'unavailable'")
    assert refusals[0][0] >= 2
    verified = await anyio.to_thread.run_sync(lambda: run_cli("audit", "verify", "--db", throwaway.url))
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_opening_a_store_on_a_server_that_is_down_is_a_store_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QPU_GATEWAY_BUSY_TIMEOUT_S", "1")
    with pytest.raises(StoreError) as raised:
        await open_store(Database(url=f"postgresql://gw:{SECRET}@127.0.0.1:{free_port()}/gateway"))
    assert raised.value.retry_after_s is not None and SECRET not in str(raised.value)


def test_the_cli_reads_the_url_from_the_environment_too(pg_url: str, tmp_path: Path) -> None:
    env = {"QPU_GATEWAY_DB": pg_url, "QPU_GATEWAY_DATA_DIR": str(tmp_path)}
    assert run_cli("init", env=env).returncode == 0
    created = run_cli("keys", "create", "--agent", "bob", env=env)
    assert created.returncode == 0 and created.stdout.startswith("qpg_")
    listed = run_cli("keys", "list", "--json", env=env)
    assert {k["agent"] for k in json.loads(listed.stdout)} == {"local", "bob"}
