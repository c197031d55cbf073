"""Hostile input through a real MCP client: fuzzed arguments, mutated OpenQASM, SQL-injection payloads.

The fuzz keeps one gateway and one client session per protocol era and drives every tool with
Hypothesis-drawn arguments. After each call: the server still answers `list_backends`, the answer
is a result or a coded error, no traceback or internal path reaches the client, and the call took
bounded time. `QPU_FUZZ_EXAMPLES` sets the calls per era (default 150, so a few hundred in
`make test`); `QPU_FUZZ_MAX_BYTES` sets the longest string (default 1 MB; the chaos profile uses
10 MB and 10,000+ calls).
"""

from __future__ import annotations

import base64
import json
import math
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.shared.exceptions import MCPError

from qpu_gateway.config import Config
from qpu_gateway.errors import BY_CODE
from qpu_gateway.jobs.runtime import Gateway
from qpu_gateway.keys import create_key
from qpu_gateway.store import open_store

from .support import BELL2, BELL3, ERAS, in_memory, new_key
from .support import body as tool_body

pytestmark = pytest.mark.anyio

FUZZ_EXAMPLES = int(os.environ.get("QPU_FUZZ_EXAMPLES", "150"))
MAX_BYTES = int(os.environ.get("QPU_FUZZ_MAX_BYTES", str(1024 * 1024)))
FUZZ_LOG = os.environ.get("QPU_FUZZ_LOG")
CALL_BOUND_S = 10.0  # a bound, not a benchmark: a hostile call must not hold the server for long

settings.register_profile(
    "qpu-fuzz",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same calls on every run, so CI failures reproduce
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
FUZZ = settings.get_profile("qpu-fuzz")

KNOWN_CODES = frozenset(BY_CODE)
LEAK_MARKERS = ("Traceback", 'File "', "/work/main", "site-packages", ".venv")
TOOLS = (
    "list_backends",
    "estimate_job",
    "submit_job",
    "get_job",
    "wait_for_job",
    "cancel_job",
    "list_jobs",
    "get_usage",
)

SQL_PAYLOADS = (
    "'; DROP TABLE jobs; --",
    '" OR 1=1 --',
    "x' OR '1'='1",
    "1; DELETE FROM audit; --",
    "') ; UPDATE keys SET revoked_at = NULL; --",
    "%' OR agent LIKE '%",
    "'; ATTACH DATABASE '/tmp/qpu-pwned.db' AS pwned; --",
    "Robert'); DROP TABLE keys;--",
    "*/ SELECT secret_hash FROM keys /*",
    "' UNION SELECT id, secret_hash, agent, project FROM keys --",
    "\\'; PRAGMA writable_schema = 1; --",
)
# Payloads that pass the agent/project name rule (letters, digits, '.', '_', '-').
NAME_RULE_PAYLOADS = ("x--", "a.--DROP-TABLE-jobs", "1-1--", "or_1.1--")


# -- strategies ---------------------------------------------------------------------------------


def _big_string(size: int, fill: str) -> str:
    return (fill * (size // max(len(fill.encode()), 1) + 1))[:size]


big_strings = st.builds(
    _big_string,
    st.sampled_from(sorted({1_000, 100_000, 100 * 1024 + 1, MAX_BYTES})),
    st.sampled_from(["x", "é", "\x00", "(", "🜁", "'; --", "\u202e"]),
)
# Hypothesis's text() leaves out lone surrogates, which JSON on a real transport cannot carry.
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=64)
control_texts = st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=32)
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 2**64, 10**100]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts, control_texts, st.sampled_from(SQL_PAYLOADS))
hostile = st.one_of(
    scalars,
    big_strings,
    st.lists(scalars, max_size=5),
    st.dictionaries(texts, scalars, max_size=4),
)

HEADERS = ('OPENQASM 2.0;\ninclude "qelib1.inc";\n', 'OPENQASM 3.0;\ninclude "stdgates.inc";\n')


def _nested(depth: int, version: int, op: str) -> str:
    expr = {"paren": "(" * depth + "1" + ")" * depth, "neg": "-" * depth + "1", "sum": "1+" * depth + "1"}[op]
    if version == 2:
        return HEADERS[0] + f"qreg q[1];\ncreg c[1];\nU({expr},0,0) q[0];\nmeasure q -> c;\n"
    return HEADERS[1] + f"qubit[1] q;\nbit[1] c;\nrx({expr}) q[0];\nc = measure q;\n"


def _register(size: str, version: int) -> str:
    if version == 2:
        return HEADERS[0] + f"qreg q[{size}];\ncreg c[1];\nmeasure q[0] -> c[0];\n"
    return HEADERS[1] + f"qubit[{size}] q;\nbit[1] c;\nc[0] = measure q[0];\n"


def _gate_chain(levels: int) -> str:
    # Kept shallow: each level doubles the expanded circuit (see the gate-chain test below).
    body = "gate g0 a { x a; }\n" + "".join(f"gate g{i} a {{ g{i - 1} a; g{i - 1} a; }}\n" for i in range(1, levels))
    return HEADERS[0] + f"qreg q[1];\ncreg c[1];\n{body}g{levels - 1} q[0];\nmeasure q -> c;\n"


def _mutate_lines(source: str, picks: list[int], action: str) -> str:
    lines = source.splitlines()
    for pick in picks:
        at = pick % len(lines)
        if action == "drop":
            lines.pop(at)
        elif action == "duplicate":
            lines.insert(at, lines[at])
        else:
            lines[at] = lines[at][::-1]
        if not lines:
            return ""
    return "\n".join(lines)


INCLUDES = ("/etc/passwd", "../../etc/shadow", "qelib1.inc\x00.txt", "file:///etc/hosts", "~/.aws/credentials", "")

mutated_qasm = st.one_of(
    st.sampled_from([BELL2, BELL3]),
    st.builds(_nested, st.integers(1, 2_000), st.sampled_from([2, 3]), st.sampled_from(["paren", "neg", "sum"])),
    st.builds(
        _register,
        st.one_of(
            st.integers(0, 10**30).map(str),
            st.sampled_from(["-1", "0x3B9ACA00", "1_000", "2 * 500", "1e9", "", "N", "99999999999999999999"]),
        ),
        st.sampled_from([2, 3]),
    ),
    st.builds(
        lambda h, g: h + f"qreg q[1];\ncreg c[1];\n{g} q[0];\nmeasure q -> c;\n", st.sampled_from(HEADERS), texts
    ),
    st.builds(
        lambda h, path: h.replace("qelib1.inc", path).replace("stdgates.inc", path),
        st.sampled_from(HEADERS),
        st.sampled_from(INCLUDES),
    ),
    st.builds(lambda h, junk: h + junk.decode("latin-1"), st.sampled_from(HEADERS), st.binary(max_size=512)),
    st.builds(lambda h, junk: h + junk, st.sampled_from(HEADERS), big_strings),
    st.builds(_gate_chain, st.integers(1, 8)),
    st.builds(
        _mutate_lines,
        st.sampled_from([BELL2, BELL3]),
        st.lists(st.integers(0, 50), min_size=1, max_size=3),
        st.sampled_from(["drop", "duplicate", "reverse"]),
    ),
    texts,
)


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def maybe(value: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(value, value, hostile)


job_ids = maybe(
    st.one_of(
        st.just("job_" + "0" * 20),
        st.text(alphabet="0123456789abcdef", max_size=20).map("job_".__add__),
        texts,
        st.sampled_from(SQL_PAYLOADS),
    )
)
# Cursors and max_cost_usd stay inside the ranges the dedicated tests below cover, so the
# fuzz keeps finding new things instead of the same one.
cursors = maybe(st.one_of(st.integers(-(2**63), 2**63 - 1).map(_cursor), texts, st.sampled_from(SQL_PAYLOADS)))
money = maybe(
    st.one_of(
        st.decimals(allow_nan=True, allow_infinity=True).map(str).filter(lambda s: "E" not in s.upper()),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(["2.50", "-1", "1e300", "1e-300", "0.0000001", "$5", "NaN", "Infinity", ""]),
    )
)
job_args = {
    "circuit": maybe(mutated_qasm),
    "circuits": maybe(st.lists(mutated_qasm, max_size=4)),
    "backend": maybe(
        st.sampled_from(["aer/simulator", "faulty/flaky", "ibm/nowhere", "aer/*", "", "aer/simulator\x00"])
    ),
    "shots": maybe(st.integers(-(10**20), 10**20)),
    "dry_run": maybe(st.booleans()),
    "max_cost_usd": money,
}
ARGS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "list_backends": {},
    "estimate_job": job_args,
    "submit_job": {
        **job_args,
        "name": maybe(st.one_of(texts, big_strings)),
        "idempotency_key": maybe(st.one_of(texts, big_strings)),
        "priority": maybe(st.sampled_from(["low", "normal", "high", "urgent", "HIGH"])),
    },
    "get_job": {"job_id": job_ids},
    "wait_for_job": {"job_id": job_ids, "timeout_s": maybe(st.floats(-1, 0.2))},
    "cancel_job": {"job_id": job_ids},
    "list_jobs": {
        "state": maybe(st.sampled_from(["running", "queued", "succeeded", "RUNNING", "done"])),
        "limit": maybe(st.integers(-5, 200)),
        "cursor": cursors,
    },
    "get_usage": {},
}


@st.composite
def tool_calls(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A tool (or now and then an unknown one) and a subset of its arguments, some hostile, plus extras."""
    name = draw(st.one_of(st.sampled_from(TOOLS), st.sampled_from(TOOLS), st.sampled_from(TOOLS), texts))
    args: dict[str, Any] = {}
    for arg, strategy in ARGS.get(name, {}).items():
        if draw(st.booleans()):
            args[arg] = draw(strategy)
    if name in ("wait_for_job",) and args.get("timeout_s") is None:
        args["timeout_s"] = 0  # never let a fuzzed call sit waiting on a real job
    args.update(draw(st.dictionaries(st.one_of(texts, st.sampled_from(SQL_PAYLOADS)), hostile, max_size=2)))
    return name, args


# -- checks -------------------------------------------------------------------------------------


def client_text(result: Any) -> str:
    """Every string the client received in one answer."""
    parts = [json.dumps(result.model_dump(mode="json"), ensure_ascii=False)]
    parts += [getattr(c, "text", "") for c in result.content]
    return "\n".join(parts)


def assert_no_leak(text: str, args: Any, *extra_markers: str) -> None:
    asked = json.dumps(args, ensure_ascii=False, default=str)
    for marker in (*LEAK_MARKERS, *extra_markers):
        # An echo of the agent's own argument is not a leak.
        assert marker not in text or marker in asked, f"{marker!r} leaked: {text[:2000]}"


def assert_coded(result: Any) -> None:
    if result.is_error:
        body = tool_body(result)
        assert body.get("code") in KNOWN_CODES, body
        assert body["code"] != "internal_error", body  # a bad argument is the agent's error, not ours
        assert isinstance(body.get("message"), str) and body["message"]
    else:
        assert isinstance(result.structured_content, dict), result.content


async def _call(client: Client, name: str, args: dict[str, Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = await client.call_tool(name, args)
    return result, time.monotonic() - started


def note_fuzzed_call(took: float) -> None:
    """`make chaos` counts the fuzzed calls and their times from this file."""
    if FUZZ_LOG:
        with open(FUZZ_LOG, "a", encoding="utf-8") as log:
            log.write(f"{took:.4f}\n")


@pytest.fixture(params=ERAS)
async def fuzz_client(request: pytest.FixtureRequest, gateway: Gateway, alice_key: str) -> AsyncIterator[Client]:
    """One long session per era: examples share the gateway, as an agent's calls would."""
    async with in_memory(gateway, alice_key, mode=request.param) as client:
        yield client


# -- the fuzz -----------------------------------------------------------------------------------


@FUZZ
@given(call=tool_calls())
async def test_fuzzed_tool_arguments_get_a_result_or_a_coded_error_and_the_server_stays_up(
    fuzz_client: Client, config: Config, call: tuple[str, dict[str, Any]]
) -> None:
    name, args = call
    result, took = await _call(fuzz_client, name, args)
    note_fuzzed_call(took)
    assert took < CALL_BOUND_S, f"{name} took {took:.1f} s"
    assert_coded(result)
    assert_no_leak(client_text(result), args, str(config.db_path.parent))
    alive, _ = await _call(fuzz_client, "list_backends", {})
    assert not alive.is_error, alive.content


@settings(FUZZ, max_examples=max(FUZZ_EXAMPLES // 3, 10))
@given(job_id=job_ids, goal=st.one_of(texts, big_strings, st.sampled_from(SQL_PAYLOADS)))
async def test_fuzzed_resource_uris_and_prompt_arguments_are_refused_cleanly(
    fuzz_client: Client, config: Config, job_id: Any, goal: str
) -> None:
    uri = f"qpu://jobs/{job_id}"
    started = time.monotonic()
    try:
        read = await fuzz_client.read_resource(uri)
        text = json.dumps(read.model_dump(mode="json"))
    except MCPError as exc:
        text = json.dumps({"message": exc.error.message, "data": exc.error.data}, default=str)
    assert_no_leak(text, uri, str(config.db_path.parent))
    prompt = await fuzz_client.get_prompt("run_circuit", {"goal": goal})
    assert_no_leak(json.dumps(prompt.model_dump(mode="json")), goal, str(config.db_path.parent))
    assert time.monotonic() - started < CALL_BOUND_S
    assert not (await fuzz_client.call_tool("list_backends", {})).is_error


# -- bugs the fuzz found ------------------------------------------------------------------------


async def test_a_cursor_with_a_huge_sequence_number_is_an_invalid_argument(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        result = await client.call_tool("list_jobs", {"cursor": _cursor(10**20)})
    assert result.is_error and tool_body(result)["code"] == "invalid_arguments", result.content


async def test_a_max_cost_beyond_decimal_range_is_an_invalid_argument(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        result = await client.call_tool("estimate_job", {"circuit": BELL2, "max_cost_usd": "1e999999"})
    assert result.is_error and tool_body(result)["code"] == "invalid_arguments", result.content


async def test_a_max_cost_with_a_huge_exponent_is_refused_as_an_argument(gateway: Gateway, alice_key: str) -> None:
    # Refused on its size before any arithmetic: such an amount once cost seconds of integer work.
    async with in_memory(gateway, alice_key) as client:
        result = await client.call_tool("estimate_job", {"circuit": BELL2, "max_cost_usd": "1e400000"})
    assert result.is_error and tool_body(result)["code"] == "invalid_arguments", result.content


async def test_a_gate_chain_that_doubles_at_each_level_is_refused_quickly(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        started = time.monotonic()
        result = await client.call_tool("estimate_job", {"circuit": _gate_chain(16)})
        took = time.monotonic() - started
    body = tool_body(result)
    refused = body["code"] if result.is_error else (body.get("refusal") or {}).get("code")
    assert refused == "limit_exceeded", body  # 32,768 expanded gates deep, above max_depth
    assert took < 1.0, f"took {took:.1f} s"


async def test_deeply_nested_openqasm3_expressions_are_refused_quickly(gateway: Gateway, alice_key: str) -> None:
    async with in_memory(gateway, alice_key) as client:
        started = time.monotonic()
        result = await client.call_tool("estimate_job", {"circuit": _nested(12_000, 3, "paren")})
        took = time.monotonic() - started
    assert result.is_error and tool_body(result)["code"] in ("invalid_circuit", "limit_exceeded")
    assert took < 1.0, f"took {took:.1f} s"


# -- SQL injection ------------------------------------------------------------------------------


def db_rows(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query, params).fetchall()


def assert_schema_intact(db: Path) -> None:
    tables = {row[0] for row in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"keys", "jobs", "audit"} <= tables, tables
    views = {row[0] for row in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'view'")}
    assert views == {"ledger"}, views
    triggers = {row[0] for row in db_rows(db, "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    assert {"audit_no_update", "audit_no_delete"} <= triggers
    assert db_rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert db_rows(db, "PRAGMA database_list")[1:] == []  # nothing ATTACHed


@pytest.mark.parametrize("payload", [*SQL_PAYLOADS, "x" * 65, "", "ok name"])
async def test_names_outside_the_name_rule_are_refused_when_creating_a_key(config: Config, payload: str) -> None:
    store = await open_store(config.database)
    try:
        for field in ("agent", "project"):
            names = {"agent": "fine", "project": "fine", field: payload}
            with pytest.raises(ValueError, match=field):
                await create_key(store, agent=names["agent"], project=names["project"], scopes=frozenset({"read"}))
    finally:
        await store.close()
    assert db_rows(config.db_path, "SELECT count(*) FROM keys") == [(0,)]


async def test_sql_payloads_in_every_string_field_are_stored_verbatim_and_harm_nothing(config: Config) -> None:
    agent, project = NAME_RULE_PAYLOADS[0], NAME_RULE_PAYLOADS[1]
    # Policy strings carry the payloads too: a section for the injected agent, patterns, a project.
    config.policy_path.write_text(
        "[defaults]\n"
        f'allowed_backends = ["aer/*", "faulty/*", {json.dumps(SQL_PAYLOADS[0])}]\n'
        f"[agents.{json.dumps(agent)}]\nmax_shots = 50\n"
        f"[agents.{json.dumps(SQL_PAYLOADS[1])}]\nmax_shots = 1\n"
        f"[projects.{json.dumps(SQL_PAYLOADS[7])}]\nmax_shots = 1\n",
        encoding="utf-8",
    )
    key = await new_key(config.database, agent, project=project)
    other = await new_key(config.database, NAME_RULE_PAYLOADS[2], project=NAME_RULE_PAYLOADS[3])
    gateway = Gateway(config)
    submitted: dict[str, str] = {}
    async with gateway.running(), in_memory(gateway, key) as client:
        for index, payload in enumerate(SQL_PAYLOADS):
            args = {"circuit": BELL2, "shots": 10, "name": payload, "idempotency_key": payload}
            result = await client.call_tool("submit_job", args)
            assert not result.is_error, result.content
            submitted[payload] = result.structured_content["job_id"]
            replay = await client.call_tool("submit_job", args)  # the payload finds its own row again
            assert replay.structured_content["job_id"] == submitted[payload], index
            for name, tool_args in (
                ("get_job", {"job_id": payload}),
                ("wait_for_job", {"job_id": payload, "timeout_s": 0}),
                ("cancel_job", {"job_id": payload}),
                ("list_jobs", {"cursor": payload}),
                ("list_jobs", {"state": payload}),
                ("estimate_job", {"circuit": BELL2, "backend": payload}),
                ("submit_job", {"circuit": BELL2, "backend": payload}),
                (payload, {"circuit": payload}),  # an unknown tool named by the payload
            ):
                refused = await client.call_tool(name, tool_args)
                assert refused.is_error and tool_body(refused)["code"] != "internal_error", (name, payload)
            with pytest.raises(MCPError):
                await client.read_resource(f"qpu://jobs/{payload}")
        capped = await client.call_tool("estimate_job", {"circuit": BELL2, "shots": 100})
        listed = await client.call_tool("list_jobs", {"limit": 100})
        async with in_memory(gateway, other) as intruder:
            theirs = await intruder.call_tool("list_jobs", {"limit": 100})

    db = config.db_path
    assert_schema_intact(db)
    # The injected agent's own policy section applied: names are looked up, never interpolated.
    assert capped.is_error and tool_body(capped)["code"] == "limit_exceeded", capped.content
    assert len(listed.structured_content["jobs"]) == len(SQL_PAYLOADS)
    assert theirs.structured_content["jobs"] == []
    rows = db_rows(db, "SELECT id, agent, project, name, idempotency_key FROM jobs")
    assert len(rows) == len(SQL_PAYLOADS)
    assert {(r[1], r[2]) for r in rows} == {(agent, project)}
    assert {r[0]: (r[3], r[4]) for r in rows} == {job_id: (p, p) for p, job_id in submitted.items()}
    keys = db_rows(db, "SELECT agent, project, revoked_at FROM keys ORDER BY created_at")
    assert keys == [(agent, project, None), (NAME_RULE_PAYLOADS[2], NAME_RULE_PAYLOADS[3], None)]
    tools = {row[0] for row in db_rows(db, "SELECT tool FROM audit")}
    assert set(SQL_PAYLOADS) <= tools  # the unknown tool's name, audited as given
    assert {f"resources/read:qpu://jobs/{p}" for p in SQL_PAYLOADS} <= tools
    audit_count = db_rows(db, "SELECT count(*) FROM audit")[0][0]
    assert audit_count >= len(SQL_PAYLOADS) * 11
    assert "pwned" not in {row[1] for row in db_rows(db, "PRAGMA database_list")}


def test_fuzz_settings_are_stable_for_ci() -> None:
    assert FUZZ.deadline is None and FUZZ.derandomize is True
    assert math.isfinite(CALL_BOUND_S) and FUZZ_EXAMPLES >= 1
