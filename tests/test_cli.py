"""The `qpu-gateway` command as an operator meets it: a real subprocess whose state lives in tmp_path."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from qpu_gateway import __version__
from qpu_gateway.config import Config
from qpu_gateway.errors import Unauthorized
from qpu_gateway.keys import SCOPES, authenticate, hash_key
from qpu_gateway.ops.cli import build_parser
from qpu_gateway.policy.file import default_policy_text
from qpu_gateway.store import open_store
from qpu_gateway.store.records import AuditEntry

from .support import BELL2, body, gateway_cmd, stdio_params

KEY = re.compile(r"^qpg_[0-9a-f]{12}_[A-Za-z0-9_\-]{43}$")
ANY_KEY = re.compile(r"qpg_[a-z0-9]{12}_")


@dataclass
class Cli:
    """`python -m qpu_gateway` in a subprocess; XDG_DATA_HOME and TMPDIR point into the test's tmp_path."""

    env: dict[str, str]
    cwd: Path

    @property
    def data_dir(self) -> Path:
        return Path(self.env["XDG_DATA_HOME"]) / "qpu-gateway"

    @property
    def db(self) -> Path:
        return self.data_dir / "gateway.db"

    def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            gateway_cmd(*args),
            env={**self.env, **(env or {})},
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def ok(self, *args: str, env: Mapping[str, str] | None = None) -> str:
        """Run a command that must succeed; return its stdout."""
        done = self(*args, env=env)
        assert done.returncode == 0, f"{args} exited {done.returncode}: {done.stderr}"
        return done.stdout

    def listed_keys(self, *args: str) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = json.loads(self.ok("keys", "list", "--json", *args))
        return listed


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QPU_GATEWAY_")}
    env.update(XDG_DATA_HOME=str(tmp_path / "xdg"), TMPDIR=str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return Cli(env=env, cwd=tmp_path)


def key_id(key: str) -> str:
    return key.split("_")[1]


def append_audit(db: Path, *entries: AuditEntry) -> None:
    async def append() -> None:
        store = await open_store(db)
        try:
            for entry in entries:
                await store.append_audit(entry, time.time())
        finally:
            await store.close()

    anyio.run(append)


# -- init --------------------------------------------------------------------------------------


def test_init_creates_the_database_the_default_policy_and_a_local_key_with_every_scope(cli: Cli) -> None:
    out = cli.ok("init")

    assert cli.db.is_file()
    policy = (cli.data_dir / "policy.toml").read_text(encoding="utf-8")
    assert policy == default_policy_text()
    assert policy.startswith("#") and "[defaults]" in policy

    lines = out.splitlines()
    key = lines[-1]
    assert KEY.match(key), out
    assert "shown once" in lines[-2]
    assert len(ANY_KEY.findall(out)) == 1

    key_file = cli.data_dir / "local.key"
    assert key_file.read_text(encoding="utf-8") == key + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    (local,) = cli.listed_keys()
    assert (local["id"], local["agent"], local["project"]) == (key_id(key), "local", "default")
    assert local["scopes"] == sorted(SCOPES)
    assert local["expires_at"] is None and local["revoked_at"] is None

    async def who() -> Any:
        store = await open_store(cli.db)
        try:
            return await authenticate(store, key)
        finally:
            await store.close()

    principal = anyio.run(who)
    assert (principal.agent, principal.scopes) == ("local", frozenset(SCOPES))


def test_init_run_again_changes_nothing_keeps_an_edited_policy_and_shows_no_key(cli: Cli) -> None:
    cli.ok("init")
    policy = cli.data_dir / "policy.toml"
    policy.write_text('[defaults]\nallowed_backends = ["aer/simulator"]\n', encoding="utf-8")
    key_before = (cli.data_dir / "local.key").read_text(encoding="utf-8")

    out = cli.ok("init")

    assert "nothing changed" in out
    assert "qpg_" not in out
    assert policy.read_text(encoding="utf-8") == '[defaults]\nallowed_backends = ["aer/simulator"]\n'
    assert (cli.data_dir / "local.key").read_text(encoding="utf-8") == key_before
    assert len(cli.listed_keys()) == 1


def test_init_writes_local_key_with_mode_0600_even_over_a_leftover_readable_file(cli: Cli) -> None:
    cli.data_dir.mkdir(parents=True)
    leftover = cli.data_dir / "local.key"
    leftover.write_text("a key from a database that was deleted\n", encoding="utf-8")
    leftover.chmod(0o644)

    key = cli.ok("init").splitlines()[-1]

    assert leftover.read_text(encoding="utf-8") == key + "\n"
    assert stat.S_IMODE(leftover.stat().st_mode) == 0o600


def test_database_location_is_the_flag_then_qpu_gateway_db_then_xdg_data_home(cli: Cli, tmp_path: Path) -> None:
    from_env = tmp_path / "from-env" / "gateway.db"
    cli.ok("init", env={"QPU_GATEWAY_DB": str(from_env)})
    assert from_env.is_file()
    assert (from_env.parent / "policy.toml").is_file() and (from_env.parent / "local.key").is_file()
    assert not cli.data_dir.exists()

    from_flag = tmp_path / "from-flag.db"
    cli.ok("keys", "create", "--agent", "flagged", "--db", str(from_flag), env={"QPU_GATEWAY_DB": str(from_env)})
    assert from_flag.is_file()
    assert [k["agent"] for k in cli.listed_keys("--db", str(from_flag))] == ["flagged"]
    assert "flagged" in cli.ok("--db", str(from_flag), "keys", "list")  # the flag also works before the command
    assert [k["agent"] for k in cli.listed_keys("--db", str(from_env))] == ["local"]

    cli.ok("init")
    assert cli.db == tmp_path / "xdg" / "qpu-gateway" / "gateway.db"
    assert cli.db.is_file() and (cli.data_dir / "policy.toml").is_file()
    assert [k["agent"] for k in cli.listed_keys()] == ["local"]


# -- keys --------------------------------------------------------------------------------------


def test_keys_create_prints_the_key_alone_and_listings_never_show_its_secret(cli: Cli) -> None:
    out = cli.ok("keys", "create", "--agent", "a", "--project", "p", "--scopes", "read,submit")

    assert out.count("\n") == 1
    key = out.strip()
    assert KEY.match(key), out

    table = cli.ok("keys", "list")
    header, *rows = table.splitlines()
    assert header.split() == ["id", "agent", "project", "scopes", "created", "expires", "last", "used", "status"]
    assert len(rows) == 1
    cells = rows[0].split()
    assert cells[:4] == [key_id(key), "a", "p", "read,submit"]
    assert cells[-2:] == ["-", "active"]

    listed = cli.ok("keys", "list", "--json")
    (entry,) = json.loads(listed)
    assert entry["id"] == key_id(key) and entry["scopes"] == ["read", "submit"]
    for output in (table, listed):
        assert key not in output
        assert key.split("_", 2)[2] not in output
        assert hash_key(key) not in output
        assert "qpg_" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "a", "--scopes", "read,launch"], "scopes must be a comma-separated subset"),
        (["--agent", "a", "--scopes", " , "], "scopes must be a comma-separated subset"),
        (["--agent", "bad name"], "agent must be"),
        (["--agent", ".hidden"], "agent must be"),
        (["--agent", "a" * 65], "agent must be"),
        (["--agent", "a", "--project", "../etc"], "project must be"),
        (["--agent", "alice\n"], "agent must be"),
        (["--agent", "a", "--project", "p\n"], "project must be"),
    ],
    ids=[
        "unknown-scope",
        "no-scope",
        "space-in-agent",
        "agent-starts-with-dot",
        "agent-too-long",
        "bad-project",
        "agent-with-a-trailing-newline",
        "project-with-a-trailing-newline",
    ],
)
def test_keys_create_refuses_bad_scopes_and_names_with_exit_2_and_creates_nothing(
    cli: Cli, args: list[str], message: str
) -> None:
    done = cli("keys", "create", *args)

    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr
    assert cli.listed_keys() == []


def test_keys_revoke_marks_the_key_revoked_and_it_no_longer_authenticates(cli: Cli) -> None:
    key = cli.ok("keys", "create", "--agent", "a").strip()

    out = cli.ok("keys", "revoke", key_id(key))

    assert f"Revoked key {key_id(key)}" in out
    assert cli.ok("keys", "list").splitlines()[1].split()[-1] == "revoked"
    (entry,) = cli.listed_keys()
    assert entry["revoked_at"] is not None

    async def check() -> None:
        store = await open_store(cli.db)
        try:
            with pytest.raises(Unauthorized, match="revoked"):
                await authenticate(store, key)
        finally:
            await store.close()

    anyio.run(check)


def test_keys_revoke_of_an_unknown_or_already_revoked_id_exits_1(cli: Cli) -> None:
    unknown = cli("keys", "revoke", "000000000000")
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert "No active key with id '000000000000'" in unknown.stderr

    key = cli.ok("keys", "create", "--agent", "a").strip()
    cli.ok("keys", "revoke", key_id(key))
    again = cli("keys", "revoke", key_id(key))
    assert again.returncode == 1
    assert "No active key" in again.stderr


@pytest.mark.parametrize(("ttl", "seconds"), [("45s", 45), ("30m", 1800), ("24h", 86400), ("30d", 2592000)])
def test_keys_create_ttl_sets_an_expiry_shown_in_keys_list(cli: Cli, ttl: str, seconds: int) -> None:
    key = cli.ok("keys", "create", "--agent", "a", "--ttl", ttl).strip()

    (entry,) = cli.listed_keys()
    assert entry["id"] == key_id(key)
    assert entry["expires_at"] - entry["created_at"] == pytest.approx(seconds)
    expires = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(entry["expires_at"])) + "Z"
    row = cli.ok("keys", "list").splitlines()[1]
    assert expires in row
    assert row.endswith("active")


def test_a_key_past_its_ttl_is_listed_as_expired(cli: Cli) -> None:
    cli.ok("keys", "create", "--agent", "a", "--ttl", "1s")
    time.sleep(1.1)

    assert cli.ok("keys", "list").splitlines()[1].endswith("expired")


@pytest.mark.parametrize("ttl", ["0h", "24", "h", "1.5h", "-1h", "24x", "1w", "twoh"])
def test_keys_create_with_a_bad_ttl_is_a_usage_error(cli: Cli, ttl: str) -> None:
    done = cli("keys", "create", "--agent", "a", f"--ttl={ttl}")

    assert done.returncode == 2
    assert done.stdout == ""
    assert "TTL is a positive number with a unit" in done.stderr
    assert not cli.db.exists()


# -- jobs and audit ----------------------------------------------------------------------------


def test_jobs_list_on_an_empty_database_prints_only_its_header(cli: Cli) -> None:
    out = cli.ok("jobs", "list")

    assert out.splitlines() == [
        "id  agent  backend  state  shots  circuits  attempts  created  name",
    ]


def test_jobs_show_of_an_unknown_job_exits_1(cli: Cli) -> None:
    done = cli("jobs", "show", "job_doesnotexist")

    assert done.returncode == 1
    assert done.stdout == ""
    assert "No job 'job_doesnotexist'" in done.stderr


def test_audit_tail_is_silent_on_a_fresh_database_and_prints_rows_once_they_exist(cli: Cli) -> None:
    assert cli.ok("audit", "tail") == ""

    append_audit(cli.db, AuditEntry(tool="x", decision="ok"))
    append_audit(
        cli.db,
        AuditEntry(
            tool="submit_job",
            decision="refused",
            agent="alice",
            key_id="abc123abc123",
            error_code="limit_exceeded",
            job_id="job_1",
            detail="too many shots",
        ),
    )

    first, second = cli.ok("audit", "tail").splitlines()
    assert first.split()[0] == "1" and first.endswith("agent=- key=- x ok")
    assert second.split()[0] == "2"
    assert "agent=alice key=abc123abc123 submit_job refused limit_exceeded job=job_1 'too many shots'" in second
    assert cli.ok("audit", "tail", "-n", "1").splitlines() == [second]
    assert cli.ok("audit", "tail", "--agent", "alice").splitlines() == [second]


@contextmanager
def following(cli: Cli, *args: str) -> Iterator[list[str]]:
    """`audit tail --follow` running in the background; yields the list of lines it has printed so far."""
    process = subprocess.Popen(
        gateway_cmd("audit", "tail", "--follow", *args),
        env=cli.env,
        cwd=cli.cwd,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield lines
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)


def printed_seqs(lines: list[str], *, until: int, timeout: float = 10.0) -> list[int]:
    """The audit seqs `audit tail -f` has printed, once it printed `until` (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seqs = [int(line.split()[0]) for line in list(lines)]
        if until in seqs:
            return seqs
        time.sleep(0.05)
    return [int(line.split()[0]) for line in list(lines)]


def test_audit_tail_follow_prints_rows_appended_after_it_started(cli: Cli) -> None:
    append_audit(cli.db, AuditEntry(tool="before", decision="ok"))

    with following(cli) as lines:
        assert printed_seqs(lines, until=1) == [1]
        append_audit(cli.db, AuditEntry(tool="after", decision="ok"))
        assert printed_seqs(lines, until=2) == [1, 2]
        assert lines[1].endswith(" after ok")


def test_audit_tail_follow_prints_every_row_of_a_burst_larger_than_its_line_count(cli: Cli) -> None:
    append_audit(cli.db, AuditEntry(tool="first", decision="ok"))

    with following(cli, "-n", "2") as lines:
        assert printed_seqs(lines, until=1) == [1]
        append_audit(cli.db, *(AuditEntry(tool=f"burst{i}", decision="ok") for i in range(5)))
        assert printed_seqs(lines, until=6) == [1, 2, 3, 4, 5, 6]


# -- the parser --------------------------------------------------------------------------------

COMMANDS = [
    (),
    ("init",),
    ("paths",),
    ("serve",),
    ("keys",),
    ("keys", "create"),
    ("keys", "list"),
    ("keys", "revoke"),
    ("keys", "rotate"),
    ("operators",),
    ("operators", "create"),
    ("operators", "list"),
    ("operators", "disable"),
    ("console",),
    ("console", "serve"),
    ("policy",),
    ("policy", "check"),
    ("policy", "show"),
    ("usage",),
    ("quota",),
    ("quota", "set"),
    ("approvals",),
    ("approvals", "list"),
    ("approvals", "approve"),
    ("approvals", "deny"),
    ("jobs",),
    ("jobs", "list"),
    ("jobs", "show"),
    ("jobs", "cancel"),
    ("agents",),
    ("agents", "pause"),
    ("agents", "resume"),
    ("agents", "list"),
    ("backends",),
    ("backends", "pause"),
    ("backends", "resume"),
    ("backends", "list"),
    ("processes",),
    ("notifications",),
    ("notifications", "list"),
    ("metrics",),
    ("metrics", "show"),
    ("metrics", "serve"),
    ("audit",),
    ("audit", "tail"),
    ("audit", "verify"),
    ("audit", "export"),
    ("db",),
    ("db", "copy"),
    ("db", "migrate"),
    ("demo",),
]


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from command_paths(sub, (*prefix, name))


def test_the_help_cases_below_cover_every_command_the_parser_defines() -> None:
    assert sorted(command_paths(build_parser())) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "qpu-gateway")
def test_every_command_answers_help_with_its_usage(cli: Cli, command: tuple[str, ...]) -> None:
    done = cli(*command, "--help")

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(" ".join(("usage: qpu-gateway", *command)))
    assert "--db" in done.stdout
    assert not cli.data_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["launch"], "invalid choice: 'launch'"),
        (["keys"], "the following arguments are required: ACTION"),
        (["keys", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["keys", "create"], "the following arguments are required: --agent"),
        (["keys", "revoke"], "the following arguments are required: id"),
        (["jobs", "show"], "the following arguments are required: id"),
        (["jobs", "cancel", "job_0"], "the following arguments are required: --reason"),
        (["agents", "pause"], "the following arguments are required: NAME"),
        (["backends", "resume"], "the following arguments are required: ID"),
        (["jobs", "list", "--state", "asleep"], "invalid choice: 'asleep'"),
        (["audit", "tail", "-n", "many"], "invalid int value: 'many'"),
        (["serve", "--transport", "pigeon"], "invalid choice: 'pigeon'"),
        (["db", "copy"], "the following arguments are required: --to"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_unknown_commands_and_missing_arguments_are_usage_errors(cli: Cli, args: list[str], message: str) -> None:
    done = cli(*args)

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("usage: qpu-gateway")
    assert message in done.stderr
    assert not cli.data_dir.exists()


def test_version_is_the_installed_distributions_version(cli: Cli) -> None:
    assert cli.ok("--version") == f"qpu-gateway {__version__}\n"
    assert __version__ == version("qpu-gateway")


# -- demo --------------------------------------------------------------------------------------


def test_demo_runs_a_bell_job_end_to_end_without_printing_a_key_or_touching_real_state(
    cli: Cli, tmp_path: Path
) -> None:
    done = cli("demo")

    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "1. list_backends" in out and "aer/simulator" in out
    assert re.search(r"2\. estimate_job .*\n\s+qubits=2 depth=3 two_qubit_gates=1 .*admitted=True", out)
    job = re.search(r"3\. submit_job -> (job_[0-9a-f]+) \(queued\)", out)
    assert job, out
    progress = re.findall(rf"^\s+progress \d+: job {job.group(1)} is (\w+)$", out, re.MULTILINE)
    assert progress and progress[-1] == "succeeded"
    assert "final state: succeeded" in out

    counts = re.search(r"register c: (\{.*\})", out)
    assert counts, out
    assert set(json.loads(counts.group(1))) <= {"00", "11"}
    assert sum(json.loads(counts.group(1)).values()) == 1000

    audit = out.split("6. the audit rows this session left")[1].splitlines()
    tools = [line.split()[2] for line in audit if line.strip().startswith("#")]
    assert tools[:3] == ["list_backends", "estimate_job", "submit_job"]
    assert tools[-1] == "wait_for_job"
    assert f"job={job.group(1)}" in audit[3]

    assert not ANY_KEY.search(out)
    assert not ANY_KEY.search(done.stderr)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not cli.data_dir.exists()


def test_demo_keep_leaves_its_throwaway_database_and_says_where(cli: Cli, tmp_path: Path) -> None:
    out = cli.ok("demo", "--keep")

    (workdir,) = (tmp_path / "tmp").iterdir()
    assert out.splitlines()[-1] == f"Kept {workdir}"
    assert (workdir / "gateway.db").is_file()


# -- serve -------------------------------------------------------------------------------------

SAMPLE_ARGUMENTS = {"job_id": "job_doesnotexist", "circuit": BELL2, "shots": 10, "timeout_s": 0}


@pytest.mark.anyio
async def test_stdio_server_without_a_key_starts_and_every_tool_says_how_to_get_one(cli: Cli, config: Config) -> None:
    async with Client(stdio_params(config, None)) as client:
        tools = (await client.list_tools()).tools
        assert {t.name for t in tools} >= {"list_backends", "estimate_job", "submit_job", "wait_for_job"}
        for tool in tools:
            properties = tool.input_schema.get("properties", {})
            arguments = {name: value for name, value in SAMPLE_ARGUMENTS.items() if name in properties}
            assert set(tool.input_schema.get("required", [])) <= set(arguments), tool.name

            result = await client.call_tool(tool.name, arguments)

            assert result.is_error, tool.name
            refusal = body(result)
            assert refusal["code"] == "unauthorized", (tool.name, refusal)
            assert "qpu-gateway keys create" in refusal["message"]
            assert "QPU_GATEWAY_KEY" in refusal["message"]
            assert str(config.db_path) in refusal["message"]  # where this stdio server looks

    audit = await anyio.run_process(
        gateway_cmd("audit", "tail", "-n", "100", "--db", str(config.db_path)), env=cli.env, cwd=cli.cwd
    )
    rows = audit.stdout.decode().splitlines()
    assert sorted(row.split()[5] for row in rows) == sorted(t.name for t in tools)
    assert all(" refused unauthorized" in row for row in rows)
