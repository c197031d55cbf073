"""A first run as a new user meets it: an uninitialised data directory, private files, JSON stderr."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client

from qpu_gateway.config import Config
from qpu_gateway.store import open_store

from .support import BELL2, ERAS, gateway_cmd, new_key, stdio_params

pytestmark = pytest.mark.anyio


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object; fails naming the first line that is not one."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"stderr line is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_serve_refuses_a_database_nobody_initialised_and_says_what_to_do(tmp_path: Path, transport: str) -> None:
    db = tmp_path / "data" / "gateway.db"
    out = subprocess.run(
        gateway_cmd("serve", "--transport", transport, "--port", "0", "--db", str(db)),
        env={**os.environ, "QPU_GATEWAY_KEY": ""},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert out.stdout == ""  # nothing on the protocol stream
    (record,) = json_lines(out.stderr)
    assert record["level"] == "error"
    assert str(db) in record["msg"] and "qpu-gateway init" in record["msg"]
    assert "QPU_GATEWAY_DB" in record["msg"] and "-e QPU_GATEWAY_DB" in record["msg"]
    assert not db.exists()  # no empty database left behind for the next start to trust


def test_init_keeps_the_data_directory_and_its_secrets_private(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    init = subprocess.run(gateway_cmd("init"), env=env, capture_output=True, text=True, timeout=60, check=True)
    db = tmp_path / "xdg" / "qpu-gateway" / "gateway.db"
    assert f"Database: {db} (created)" in init.stdout
    assert mode_of(db.parent) == 0o700
    assert mode_of(db) == 0o600 and mode_of(db.with_name("local.key")) == 0o600


async def test_a_stdio_server_logs_the_database_it_opened_and_names_it_when_a_key_is_unknown(
    config: Config, tmp_path: Path
) -> None:
    other = tmp_path / "other.db"
    key_elsewhere = await new_key(other, "alice")  # a real key, made for another database
    await (await open_store(config.database)).close()
    params = stdio_params(config, key_elsewhere)
    params.args[params.args.index("warning")] = "info"
    log = tmp_path / "stdio.stderr"
    with log.open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:  # type: ignore[arg-type]
            refused = await client.call_tool("list_backends", {})
    assert refused.is_error
    message = refused.content[0].text  # type: ignore[union-attr]
    assert "unauthorized" in message
    assert str(config.db_path) in message and "QPU_GATEWAY_KEY" in message
    records = json_lines(log.read_text())
    opened = [r for r in records if r["msg"].startswith("opened database")]
    assert opened and opened[0]["db"] == str(config.db_path) and opened[0]["active_keys"] == 0
    warned = [r for r in records if r["level"] == "warning" and "has no active key" in r["msg"]]
    assert warned, records


async def test_the_database_and_its_wal_files_are_readable_by_their_owner_only(config: Config) -> None:
    key = await new_key(config.database, "alice")
    params = stdio_params(config, key)
    async with Client(stdio_client(params)) as client:  # type: ignore[arg-type]
        submitted = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 10})
        assert not submitted.is_error
        wal, shm = (config.db_path.with_name(config.db_path.name + suffix) for suffix in ("-wal", "-shm"))
        assert wal.exists() and shm.exists()  # the server holds the database open in WAL mode
        assert [mode_of(p) for p in (config.db_path, wal, shm)] == [0o600, 0o600, 0o600]


async def test_an_existing_database_readable_by_others_is_narrowed_when_opened(config: Config) -> None:
    await new_key(config.database, "alice")
    os.chmod(config.db_path, 0o644)
    store = await open_store(config.database)
    try:
        await store.list_keys()
        assert mode_of(config.db_path) == 0o600
    finally:
        await store.close()


# What a serving process's stderr collects from other code, written by a real process with the
# gateway's logging in place: a library's own console handler (qiskit-ibm-runtime attaches one at
# import), a Python warning, a print to stderr, an exception in a thread, and a stray print to stdout.
STRAYS = textwrap.dedent(
    """
    import logging, sys, threading, warnings
    from qpu_gateway.telemetry import logs

    logs.setup("info")
    logs.structured_streams(stdout=True)
    import qiskit_ibm_runtime  # attaches a StreamHandler with its own format, propagate off
    ibm = logging.getLogger("qiskit_ibm_runtime.api")
    ibm.setLevel(logging.INFO)
    ibm.info("management.get first")
    ibm.info("management.get second")
    warnings.warn("a library's warning")
    print("a library prints to stderr", file=sys.stderr)
    print("a stray print while stdout is the protocol")
    thread = threading.Thread(target=lambda: 1 / 0, name="sdk-thread")
    thread.start(); thread.join()
    print("Traceback (most recent call last):\\n  a multi-line ERROR text", file=sys.stderr)
    sys.stderr.flush()
    """
)


def test_every_line_a_serving_process_writes_to_stderr_is_one_json_object() -> None:
    out = subprocess.run([sys.executable, "-c", STRAYS], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    records = json_lines(out.stderr)
    by_text = {r["msg"]: r for r in records}
    # The library's handler is re-formatted: its records keep their level and logger name.
    assert by_text["management.get second"]["logger"] == "qiskit_ibm_runtime.api"
    assert by_text["management.get second"]["level"] == "info"
    first = next(r for r in records if "management.get first" in r["msg"])
    assert first["level"] == "info"  # the line that led to the re-formatting, read by its level word
    warning = next(r for r in records if "a library's warning" in r["msg"])
    assert warning["logger"] == "py.warnings" and warning["level"] == "warning"
    assert by_text["a library prints to stderr"]["logger"] == "stderr"
    assert by_text["a stray print while stdout is the protocol"]["logger"] == "stdout"
    crash = by_text["uncaught exception in thread sdk-thread"]
    assert crash["level"] == "error" and "ZeroDivisionError" in crash["exc"]


@pytest.mark.parametrize("mode", ERAS)
async def test_a_stdio_server_running_an_ibm_job_writes_only_json_to_stderr(
    config: Config, tmp_path: Path, mode: str
) -> None:
    key = await new_key(config.database, "alice")
    config.policy_path.write_text('[defaults]\nallowed_backends = ["aer/*", "ibm/*"]\n', encoding="utf-8")
    params = stdio_params(config, key, QISKIT_IBM_RUNTIME_LOG_LEVEL="DEBUG", PYTHONWARNINGS="always")
    params.args[params.args.index("warning")] = "debug"
    log = tmp_path / "stdio.stderr"
    with log.open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:  # type: ignore[arg-type]
            submitted = await client.call_tool(
                "submit_job", {"circuit": BELL2, "shots": 50, "backend": "ibm/fake_manila"}
            )
            assert not submitted.is_error, submitted.content
            job_id = json.loads(submitted.content[0].text)["job_id"]  # type: ignore[union-attr]
            done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 120})
            assert json.loads(done.content[0].text)["state"] == "succeeded"  # type: ignore[union-attr]
    records = json_lines(log.read_text())
    assert any(r["logger"].startswith("qiskit_ibm_runtime") for r in records), "IBM's own logger was heard"


def test_paths_prints_where_the_files_are_honouring_xdg_data_home(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPU_GATEWAY_")}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    before = json.loads(subprocess.check_output(gateway_cmd("paths", "--json"), env=env, text=True))
    home = tmp_path / "xdg" / "qpu-gateway"
    assert before["database"] == {"path": str(home / "gateway.db"), "state": "missing", "from": "$XDG_DATA_HOME"}
    assert before["local key"]["path"] == str(home / "local.key")
    subprocess.run(gateway_cmd("init"), env=env, capture_output=True, check=True)
    after = json.loads(subprocess.check_output(gateway_cmd("paths", "--json"), env=env, text=True))
    assert after["database"]["state"] == "initialised" and after["local key"]["state"] == "present"
    assert after["policy"] == {"path": str(home / "policy.toml"), "state": "present", "from": "beside the database"}
    flagged = json.loads(
        subprocess.check_output(gateway_cmd("paths", "--json", "--db", str(tmp_path / "x.db")), env=env, text=True)
    )
    assert flagged["database"]["from"] == "--db" and flagged["policy"]["path"] == str(tmp_path / "policy.toml")


async def test_a_relative_database_path_is_the_same_file_for_init_serve_and_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPU_GATEWAY_")}
    flags = ["--db", "data/gateway.db"]  # relative to the folder the operator runs in
    made = await anyio.run_process(gateway_cmd("init", *flags), cwd=tmp_path, env=env)
    key = made.stdout.decode().strip().splitlines()[-1]
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "qpu_gateway", "serve", "--transport", "stdio", *flags],
        env={**env, "QPU_GATEWAY_KEY": key},
        cwd=tmp_path,
    )
    with (tmp_path / "stdio.stderr").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:  # type: ignore[arg-type]
            listed = await client.call_tool("list_backends", {})
    assert not listed.is_error, listed.content
    opened = [r for r in json_lines((tmp_path / "stdio.stderr").read_text()) if r["msg"].startswith("opened")]
    assert opened[0]["db"] == str(tmp_path / "data" / "gateway.db") and opened[0]["active_keys"] == 1
    shown = json.loads((await anyio.run_process(gateway_cmd("paths", "--json", *flags), cwd=tmp_path, env=env)).stdout)
    assert shown["database"] == {"path": str(tmp_path / "data" / "gateway.db"), "state": "initialised", "from": "--db"}
