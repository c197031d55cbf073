"""`qpu-gateway demo`: a scripted agent session through a real MCP client over stdio.

It builds a throw-away database, issues a key, starts `qpu-gateway serve --transport stdio`
as a subprocess exactly as Claude Code would (legacy `initialize` handshake), and walks the
whole job path: list backends, estimate, submit a Bell circuit, wait with progress, print the
counts and the audit rows the session left.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

from qpu_gateway.config import ENV_KEY
from qpu_gateway.keys import SCOPES, create_key
from qpu_gateway.store import open_store

BELL = """OPENQASM 2.0;
include "qelib1.inc";
qreg q[2];
creg c[2];
h q[0];
cx q[0], q[1];
measure q -> c;
"""


def _say(text: str) -> None:
    print(text, flush=True)


async def _session(workdir: Path) -> None:
    db = workdir / "gateway.db"
    store = await open_store(db)
    try:
        _, key = await create_key(store, agent="demo-agent", project="demo", scopes=frozenset(SCOPES))
    finally:
        await store.close()

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "qpu_gateway", "serve", "--transport", "stdio", "--db", str(db), "--log-level", "warning"],
        env={ENV_KEY: key},
    )
    _say(f"Starting the gateway over stdio against a throw-away database in {workdir}")
    async with Client(params, mode="legacy") as client:
        _say(f"Connected (protocol {client.protocol_version}).\n")

        listing = await client.call_tool("list_backends", {})
        backends = (listing.structured_content or {}).get("backends", [])
        _say("1. list_backends")
        for b in backends:
            _say(
                f"   {b['id']:<20} qubits={b['qubits']} simulator={b['simulator']} status={b['status']} "
                f"price={b['price_model']} allowed={b['allowed']}"
            )

        estimate = await client.call_tool("estimate_job", {"circuit": BELL, "shots": 1000})
        est: dict[str, Any] = estimate.structured_content or {}
        _say("\n2. estimate_job (Bell pair, 1000 shots)")
        _say(
            f"   qubits={est.get('qubits')} depth={est.get('depth')} two_qubit_gates={est.get('two_qubit_gates')} "
            f"cost={est.get('cost_usd')} admitted={est.get('admitted')}"
        )

        submitted = await client.call_tool("submit_job", {"circuit": BELL, "shots": 1000, "name": "demo bell"})
        sub: dict[str, Any] = submitted.structured_content or {}
        if submitted.is_error:
            raise RuntimeError(f"submit refused: {sub}")
        job_id = sub["job_id"]
        _say(f"\n3. submit_job -> {job_id} ({sub['state']}), resource {sub['uri']}")

        _say("\n4. wait_for_job")

        async def progress(progress: float, total: float | None, message: str | None) -> None:
            _say(f"   progress {int(progress)}: {message}")

        done = await client.call_tool("wait_for_job", {"job_id": job_id, "timeout_s": 120}, progress_callback=progress)
        view: dict[str, Any] = done.structured_content or {}
        await anyio.sleep(0.1)  # let the last progress line print before the result
        _say(f"   final state: {view.get('state')}, attempts={view.get('attempts')}")
        if view.get("state") != "succeeded":
            raise RuntimeError(f"the demo job did not succeed: {json.dumps(view.get('error'))}")
        _say("\n5. counts")
        for register, counts in view["result"]["counts"][0].items():
            _say(f"   register {register}: {json.dumps(dict(sorted(counts.items())))}")

    store = await open_store(db)
    try:
        rows = await store.audit_tail(limit=100)
    finally:
        await store.close()
    _say("\n6. the audit rows this session left")
    for r in rows:
        _say(
            f"   #{r.seq:<3} agent={r.agent or '-':<10} {r.tool:<16} {r.decision:<7} "
            f"{('job=' + r.job_id) if r.job_id else ''} {r.error_code or ''}".rstrip()
        )


def run_demo(*, keep: bool = False) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="qpu-gateway-demo-"))
    try:
        anyio.run(_session, workdir)
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if keep:
            _say(f"\nKept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
