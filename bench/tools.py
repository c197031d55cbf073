"""Calling the gateway's tools from a bench client, and checking each answer is the one expected.

A benchmark that times refusals it did not mean to get measures nothing, so every call's outcome
is checked: an unexpected error stops the run with the gateway's own message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from mcp import Client

from bench.circuits import SHOTS


class UnexpectedAnswer(RuntimeError):
    """A call answered other than the measure assumes (refused when it should run, or the reverse)."""


def body(result: Any) -> dict[str, Any]:
    """A success's structured content; an error's coded JSON text (errors carry no structured content)."""
    if result.structured_content is not None:
        return dict(result.structured_content)
    texts = " ".join(getattr(c, "text", "") for c in result.content)
    try:
        coded = json.loads(texts)
    except ValueError:
        return {"text": texts}
    return coded if isinstance(coded, dict) else {"text": texts}


async def ok(client: Client, tool: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments or {})
    if result.is_error:
        raise UnexpectedAnswer(f"{tool} failed: {body(result)}")
    return body(result)


async def refused(client: Client, tool: str, arguments: dict[str, Any], code: str) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    answer = body(result)
    if not result.is_error or answer.get("code") != code:
        raise UnexpectedAnswer(f"{tool} should have been refused with {code}, got {answer}")
    return answer


async def submit(client: Client, source: str | list[str], *, shots: int = SHOTS) -> str:
    arguments: dict[str, Any] = {"shots": shots}
    arguments["circuits" if isinstance(source, list) else "circuit"] = source
    return str((await ok(client, "submit_job", arguments))["job_id"])


async def await_job(client: Client, job_id: str) -> tuple[dict[str, Any], int]:
    """wait_for_job until the job ends; returns the job and the number of calls it took. It must succeed."""
    calls = 0
    while True:
        calls += 1
        job = await ok(client, "wait_for_job", {"job_id": job_id, "timeout_s": 600})
        if job["terminal"]:
            if job["state"] != "succeeded":
                raise UnexpectedAnswer(f"job {job_id} ended {job['state']}: {job.get('error')}")
            return job, calls


async def full_counts(client: Client, job_id: str) -> list[dict[str, dict[str, int]]]:
    """Every count of a finished job, from its resource (get_job summarises results over 20 circuits)."""
    resource = await client.read_resource(f"qpu://jobs/{job_id}")
    job = json.loads(getattr(resource.contents[0], "text", "{}"))
    return list(job["result"]["counts"])


async def timed_ms(call: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await call()
    return (time.perf_counter() - began) * 1000
