"""HTTP without a good key, as a client meets it: a real `qpu-gateway serve` on loopback answers 401
saying how to get and send a key, claims no authorization server anywhere, and audits every refusal."""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
import httpx2
import pytest

from qpu_gateway.config import Config
from qpu_gateway.store import open_store

from .support import HttpServer, eventually, http_client, new_key, start_http_server

pytestmark = pytest.mark.anyio

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "curl", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}
# Where OAuth clients look for a protected resource's metadata and an authorization server's (RFC 9728,
# RFC 8414, OpenID discovery), and where they register (RFC 7591), for the path /mcp.
DISCOVERY = [
    "/.well-known/oauth-protected-resource/mcp",
    "/.well-known/oauth-protected-resource",
    "/.well-known/oauth-authorization-server",
    "/.well-known/oauth-authorization-server/mcp",
    "/.well-known/openid-configuration",
]


def base_of(server: HttpServer) -> str:
    return server.url.rsplit("/", 1)[0]


async def http_auth_rows(config: Config) -> list[Any]:
    store = await open_store(config.database)
    try:
        return [row for row in await store.audit_tail(limit=1000) if row.tool == "http.auth"]
    finally:
        await store.close()


def assert_says_how_to_get_and_send_a_key(response: httpx2.Response) -> None:
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="qpu-gateway"'), challenge
    assert "resource_metadata" not in challenge  # no metadata to discover, no authorization server
    body = response.json()
    assert body["code"] == "unauthorized"
    for text in (challenge, body["message"]):
        assert "qpu-gateway keys create --agent NAME" in text
        assert "Authorization: Bearer <key>" in text


async def test_a_request_without_a_key_is_told_how_to_get_and_send_one_and_leaves_one_audit_row(
    http_server: HttpServer, config: Config
) -> None:
    async with httpx2.AsyncClient() as http:
        response = await http.post(http_server.url, json=INITIALIZE, headers=MCP_HEADERS)

    assert response.status_code == 401
    assert_says_how_to_get_and_send_a_key(response)
    assert "error=" not in response.headers["www-authenticate"]  # RFC 6750 3.1: no key sent, no error code

    async def one_row() -> bool:
        return len(await http_auth_rows(config)) == 1

    await eventually(one_row)
    (row,) = await http_auth_rows(config)
    assert (row.decision, row.error_code, row.detail, row.agent) == ("refused", "unauthorized", "no key", None)


async def test_a_wrong_key_and_a_revoked_key_are_refused_alike_and_each_audited(
    http_server: HttpServer, config: Config
) -> None:
    revoked = await new_key(config.database, "carol")
    async with http_client(http_server.url, revoked, mode="legacy") as client:
        assert not (await client.call_tool("get_usage", {})).is_error
    revoke = await anyio.run_process(
        [sys.executable, "-m", "qpu_gateway", "keys", "revoke", revoked.split("_")[1], "--db", str(config.db_path)]
    )
    assert revoke.returncode == 0
    wrong = "qpg_000000000000_" + "w" * 43
    async with httpx2.AsyncClient() as http:
        answers = [
            await http.post(http_server.url, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {k}"})
            for k in (wrong, revoked)
        ]

    for response in answers:
        assert response.status_code == 401
        assert_says_how_to_get_and_send_a_key(response)
        assert 'error="invalid_token"' in response.headers["www-authenticate"]
        assert "revoked" in response.json()["message"]  # the same words for both: no hint which keys exist
        assert wrong not in response.text and revoked not in response.text
    assert answers[0].json() == answers[1].json()

    async def two_rows() -> bool:
        return len(await http_auth_rows(config)) == 2

    await eventually(two_rows)
    assert {row.detail for row in await http_auth_rows(config)} == {"unauthorized"}


async def test_the_gateway_claims_no_authorization_server_anywhere(http_server: HttpServer, config: Config) -> None:
    key = await new_key(config.database, "alice")
    base = base_of(http_server)
    async with httpx2.AsyncClient() as http:
        for auth in ({}, {"Authorization": f"Bearer {key}"}):
            for path in DISCOVERY:
                found = await http.get(base + path, headers=auth)
                assert found.status_code == 404, (path, found.text)
            registered = await http.post(base + "/register", json={"redirect_uris": ["http://127.0.0.1:1/cb"]})
            assert registered.status_code == 404
        unauthorized = await http.post(http_server.url, json=INITIALIZE, headers=MCP_HEADERS)
    assert "authorization_servers" not in unauthorized.text
    assert "resource_metadata" not in json.dumps(dict(unauthorized.headers))


async def test_the_sse_transport_answers_a_missing_key_the_same_way(config: Config) -> None:
    server = start_http_server(config, "sse")
    try:
        async with httpx2.AsyncClient() as http:
            stream = await http.get(server.url, headers={"Accept": "text/event-stream"})
            message = await http.post(base_of(server) + "/messages/?session_id=0", json=INITIALIZE)
    finally:
        server.stop()
    for response in (stream, message):
        assert response.status_code == 401
        assert_says_how_to_get_and_send_a_key(response)
