"""The gateway as users run it: real server processes over stdio, Streamable HTTP and SSE."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from qpu_gateway.config import Config

from .support import BELL2, ERAS, HttpServer, body, free_port, http_client, new_key, start_http_server, stdio_params

pytestmark = pytest.mark.anyio


async def run_one_job(client: Client) -> dict[str, Any]:
    submitted = await client.call_tool("submit_job", {"circuit": BELL2, "shots": 200})
    assert not submitted.is_error, submitted.content
    done = await client.call_tool("wait_for_job", {"job_id": submitted.structured_content["job_id"]})
    return dict(done.structured_content or {})


@pytest.mark.parametrize("mode", ERAS)
async def test_stdio_subprocess_runs_a_job_on_each_era(config: Config, alice_key: str, mode: str) -> None:
    async with Client(stdio_params(config, alice_key), mode=mode) as client:  # type: ignore[arg-type]
        expected = "2025-11-25" if mode == "legacy" else "2026-07-28"
        assert client.protocol_version == expected
        done = await run_one_job(client)
    assert done["state"] == "succeeded"
    assert sum(done["result"]["counts"][0]["c"].values()) == 200


@pytest.mark.parametrize("mode", ERAS)
async def test_streamable_http_runs_a_job_on_each_era(http_server: HttpServer, alice_key: str, mode: str) -> None:
    async with http_client(http_server.url, alice_key, mode=mode) as client:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        done = await run_one_job(client)
        usage = (await client.call_tool("get_usage", {})).structured_content
    assert done["state"] == "succeeded" and usage["agent"] == "alice"


async def test_sse_runs_a_job(config: Config, alice_key: str) -> None:
    server = start_http_server(config, transport="sse")
    try:
        headers = {"Authorization": f"Bearer {alice_key}"}
        async with Client(sse_client(server.url, headers=headers), mode="legacy") as client:  # type: ignore[arg-type]
            done = await run_one_job(client)
    finally:
        server.stop()
    assert done["state"] == "succeeded"


@pytest.mark.parametrize("path", ["/mcp"])
async def test_http_refuses_requests_without_a_valid_key_before_any_work(http_server: HttpServer, path: str) -> None:
    base = http_server.url.removesuffix("/mcp")
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    headers = {"Accept": "application/json, text/event-stream", "MCP-Protocol-Version": "2026-07-28"}
    async with httpx2.AsyncClient() as http:
        missing = await http.post(base + path, json=request, headers=headers)
        wrong = await http.post(
            base + path,
            json=request,
            headers={**headers, "Authorization": "Bearer qpg_000000000000_" + "y" * 43},
        )
    assert missing.status_code == 401 and wrong.status_code == 401
    assert "qpg_000000000000" not in wrong.text


async def test_http_rejects_a_foreign_host_header(http_server: HttpServer, alice_key: str) -> None:
    request = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    async with httpx2.AsyncClient() as http:
        response = await http.post(
            http_server.url,
            json=request,
            headers={
                "Authorization": f"Bearer {alice_key}",
                "Host": "evil.example:80",
                "Accept": "application/json, text/event-stream",
                "MCP-Protocol-Version": "2026-07-28",
            },
        )
    assert response.status_code in (400, 403, 421)


async def test_a_key_revoked_by_the_cli_fails_at_once_in_a_running_server(
    http_server: HttpServer, config: Config
) -> None:
    key = await new_key(config.database, "carol")
    async with http_client(http_server.url, key, mode="legacy") as client:
        assert not (await client.call_tool("get_usage", {})).is_error
        revoke = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "qpu_gateway",
                "keys",
                "revoke",
                key.split("_")[1],
                "--db",
                str(config.db_path),
            ],
            check=False,
        )
        assert revoke.returncode == 0, revoke.stderr.decode()
        with pytest.raises(MCPError, match="error response"):  # the HTTP layer answers 401 now
            await client.call_tool("get_usage", {})
    async with Client(stdio_params(config, key)) as stdio:  # type: ignore[arg-type]
        refused = await stdio.call_tool("get_usage", {})
    assert refused.is_error and body(refused)["code"] == "unauthorized"


def test_the_server_answers_initialize_without_importing_any_provider_sdk(config: Config) -> None:
    script = textwrap.dedent(
        f"""
        import sys, anyio
        from pathlib import Path
        from mcp import Client
        from qpu_gateway.mcp.app import build_server
        from qpu_gateway.config import Config, Database
        from qpu_gateway.jobs.runtime import Gateway

        async def main():
            db, policy = Path({str(config.db_path)!r}), Path({str(config.policy_path)!r})
            gateway = Gateway(Config(database=Database(path=db), policy_path=policy))
            async with Client(build_server(gateway, lambda: None), mode="legacy") as client:
                assert client.protocol_version == "2025-11-25"
                await client.list_tools()
                heavy = [m for m in ("qiskit", "qiskit_aer", "qiskit_ibm_runtime", "braket", "azure.quantum", "numpy")
                         if m in sys.modules]
                print("HEAVY", heavy)

        anyio.run(main)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def test_serve_over_http_prints_the_url_the_local_key_and_a_client_config(tmp_path: Any) -> None:
    db = tmp_path / "gateway.db"
    init = subprocess.run(
        [sys.executable, "-m", "qpu_gateway", "init", "--db", str(db)], capture_output=True, text=True, check=True
    )
    key = init.stdout.strip().splitlines()[-1]
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qpu_gateway",
            "serve",
            "--transport",
            "http",
            "--port",
            str(port),
            "--db",
            str(db),
            "--show-key",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = []
        for line in process.stdout:
            banner.append(line)
            if line.startswith("Press Ctrl-C"):
                break
    finally:
        process.terminate()
        process.wait(timeout=20)
    text = "".join(banner)
    url = f"http://127.0.0.1:{port}/mcp"
    assert url in text and key in text
    config = json.loads(text[text.index("{") : text.rindex("}") + 1])
    server = config["mcpServers"]["qpu-gateway"]
    assert server == {"type": "http", "url": url, "headers": {"Authorization": f"Bearer {key}"}}
    assert f"http://127.0.0.1:{port}/console" in text and f"http://127.0.0.1:{port}/metrics" in text


@pytest.mark.parametrize("transport", ["stdio", "http"])
async def test_a_person_approves_a_costly_job_over_a_real_transport(
    config: Config, alice_key: str, transport: str
) -> None:
    from mcp_types import ElicitResult

    config.policy_path.write_text(
        '[defaults]\nallowed_backends = ["faulty/*"]\nconfirm_above_usd = "1.00"\n'
        '[prices."faulty/*"]\nmodel = "per_task_shot"\nper_task_usd = "2.00"\nper_shot_usd = "0"\n',
        encoding="utf-8",
    )
    asked: list[str] = []

    async def approve(context: Any, params: Any) -> ElicitResult:
        asked.append(params.message)
        return ElicitResult(action="accept", content={"approve": True})

    args = {"circuit": BELL2, "backend": "faulty/qpu"}
    if transport == "stdio":
        params = stdio_params(config, alice_key, QPU_GATEWAY_FAULTS="ok")
        async with Client(params, mode="legacy", elicitation_callback=approve) as client:  # type: ignore[arg-type]
            job = (await client.call_tool("submit_job", args)).structured_content
            done = (await client.call_tool("wait_for_job", {"job_id": job["job_id"]})).structured_content
    else:
        server = start_http_server(config, QPU_GATEWAY_FAULTS="ok")
        try:
            headers = {"Authorization": f"Bearer {alice_key}"}
            async with (
                httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=300)) as http,
                Client(streamable_http_client(server.url, http_client=http), elicitation_callback=approve) as client,  # type: ignore[arg-type]
            ):
                job = (await client.call_tool("submit_job", args)).structured_content
                done = (await client.call_tool("wait_for_job", {"job_id": job["job_id"]})).structured_content
        finally:
            server.stop()
    assert len(asked) == 1 and "$2.00" in asked[0]
    assert done["state"] == "succeeded"
