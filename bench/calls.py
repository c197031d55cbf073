"""Per-call round trips over stdio: get_job, submit_job and a rate-limited refusal, each against a no-op.

The no-op is a tool added to our own server (`bench.gateway_server`), so it pays what every call
pays (the SDK, stdio, the gateway middleware's key check and audit row) and nothing else. The
ratio is then the cost of the tool's own work over the gateway's floor. Each measure runs in
rounds; a round is a block of no-op calls followed by a block of the measured tool on the same
session, so both sides see the same machine load.

submit_job runs the whole admission path of the default policy (parse, caps, price, rate-limit
checks, loop guard, quota, job row + ledger + audit in one transaction) with its rate limits
raised (see bench/policies.py). Every submission is a different 5-qubit circuit. The jobs run
on the server's own worker, so after each block of submissions the bench waits for them to
finish before the next no-op block: the no-op never competes with a simulation the measure
itself queued, while submissions within a block do meet the worker, as they would in use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from mcp import Client

from bench import env, policies, tools
from bench.circuits import BELL, circuit
from bench.context import Context
from bench.model import Row, Target
from bench.stats import Summary

NAMES = ("get_job", "submit_job", "refused")
Call = Callable[[], Awaitable[object]]


async def interleave(
    ctx: Context,
    label: str,
    noop: Call,
    subject: Call,
    *,
    rounds: int,
    per_round: int,
    after_subject: Callable[[], Awaitable[None]] | None = None,
) -> tuple[list[float], list[float]]:
    """Round after round: `per_round` no-op calls, then `per_round` subject calls; ms per call."""
    for _ in range(max(3, per_round // 5)):  # warm-up, not recorded
        await noop()
        await subject()
    if after_subject is not None:
        await after_subject()
    base: list[float] = []
    ours: list[float] = []
    for r in range(rounds):
        base += [await tools.timed_ms(noop) for _ in range(per_round)]
        ours += [await tools.timed_ms(subject) for _ in range(per_round)]
        if after_subject is not None:
            await after_subject()
        noop_p50, ours_p50 = Summary.of(base).median, Summary.of(ours).median
        ctx.log(f"{label} round {r + 1}/{rounds}: no-op p50 {noop_p50:.2f} ms, ours {ours_p50:.2f} ms")
    return base, ours


def _noop(client: Client) -> Call:
    return lambda: tools.ok(client, "noop")


def _row(name: str, base: list[float], ours: list[float], target: float, notes: list[str]) -> Row:
    return Row(
        name,
        "ms",
        Summary.of(base, latency=True),
        Summary.of(ours, latency=True),
        Target("<=", target),
        "no-op tool on our server",
        notes=notes,
    )


async def get_job(ctx: Context) -> Row:
    files = await env.gateway_files(ctx.scratch("get_job"), policies.admitting())
    async with env.stdio_client(env.gateway_params(files, noop=True)) as client:
        job_id = await tools.submit(client, BELL, shots=1000)
        await tools.await_job(client, job_id)  # a finished job with counts: the common read
        base, ours = await interleave(
            ctx,
            "get_job",
            _noop(client),
            lambda: tools.ok(client, "get_job", {"job_id": job_id}),
            rounds=ctx.pick(6, 2),
            per_round=ctx.pick(60, 15),
        )
    return _row("get_job round trip p50, stdio", base, ours, 1.3, ["a succeeded Bell job, 1000 shots"])


async def submit_job(ctx: Context) -> Row:
    files = await env.gateway_files(ctx.scratch("submit_job"), policies.admitting())
    submitted: list[str] = []
    counter = iter(range(10**9))

    async def subject() -> None:
        submitted.append(await tools.submit(client, circuit(next(counter))))

    async def drain() -> None:
        for job_id in submitted:
            await tools.await_job(client, job_id)
        submitted.clear()

    async with env.stdio_client(env.gateway_params(files, noop=True)) as client:
        base, ours = await interleave(
            ctx,
            "submit_job",
            _noop(client),
            subject,
            rounds=ctx.pick(6, 2),
            per_round=ctx.pick(30, 10),
            after_subject=drain,
        )
    notes = ["default policy, rate limits raised; a different 5-qubit 100-shot circuit per call"]
    return _row("submit_job round trip p50, stdio", base, ours, 2.0, notes)


async def refused(ctx: Context) -> Row:
    files = await env.gateway_files(ctx.scratch("refused"), policies.refusing())
    counter = iter(range(10**9))
    async with env.stdio_client(env.gateway_params(files, noop=True)) as client:
        await tools.submit(client, circuit(next(counter)))  # spends the one submit the hour allows

        def subject() -> Awaitable[object]:
            return tools.refused(client, "submit_job", {"circuit": circuit(next(counter))}, "rate_limited")

        base, ours = await interleave(
            ctx, "refused", _noop(client), subject, rounds=ctx.pick(6, 2), per_round=ctx.pick(60, 15)
        )
    notes = ["submit_job refused by a 1/hour rate limit; every measured call checked to be rate_limited"]
    return _row("refused call (rate limited) p50, stdio", base, ours, 1.5, notes)


async def run(ctx: Context, names: set[str]) -> list[Row]:
    measures = {"get_job": get_job, "submit_job": submit_job, "refused": refused}
    return [await measures[name](ctx) for name in NAMES if name in names]
