"""The `qpu-gateway` command: init, paths, serve, keys, quotas, approvals, jobs, agents, backends, audit, db, demo.

Exit codes: 0 ok, 1 runtime error, 2 usage error (argparse's own). Output meant for scripts
(`keys create`) goes to stdout alone; logs go to stderr. Every act that changes what agents may do
(keys, quotas, approvals, pauses, cancels) writes an audit row naming the operator: the OS user
running this command.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anyio

from qpu_gateway import __version__
from qpu_gateway.audit.chain import exported
from qpu_gateway.audit.operators import operator_entry, operator_name
from qpu_gateway.config import ENV_DB, ENV_KEY, ENV_POLICY, Config
from qpu_gateway.jobs.states import JobState
from qpu_gateway.keys import SCOPES, create_key, parse_scopes
from qpu_gateway.policy.file import PolicyFileError, default_policy_text
from qpu_gateway.store import Store, StoreError, open_store, store_initialised
from qpu_gateway.telemetry import logs

T = TypeVar("T")
LOCAL_AGENT = "local"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


class CliError(Exception):
    """A runtime failure to report in one line (exit 1)."""


def local_key_path(config: Config) -> Path:
    """Where `init` keeps the `local` agent's key for `make run` (mode 0600, in the data directory:
    beside a SQLite database)."""
    return config.files / "local.key"


# -- helpers -----------------------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return Config.resolve(
        db=getattr(args, "db", None), policy=getattr(args, "policy", None), data_dir=getattr(args, "data_dir", None)
    )


def _with_store(config: Config, action: Callable[[Store], Awaitable[T]], *, migrate: bool = True) -> T:
    async def main() -> T:
        store = await open_store(config.database, migrate=migrate)
        try:
            return await action(store)
        finally:
            await store.close()

    return anyio.run(main)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _ttl(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise argparse.ArgumentTypeError("TTL is a positive number with a unit: 30m, 24h, 30d")
    return int(text[:-1]) * units[text[-1]]


# -- commands ----------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    config = _config(args)
    created_policy = False
    if not config.policy_path.exists():
        config.policy_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # beside local.key
        config.policy_path.write_text(default_policy_text(), encoding="utf-8")
        created_policy = True
    if config.database.url is not None:
        from qpu_gateway.store.postgres import create_database

        store_existed = not create_database(config.database.url)
    else:
        store_existed = config.db_path.exists()
    config.files.mkdir(parents=True, exist_ok=True, mode=0o700)  # where local.key goes

    async def action(store: Store) -> tuple[list[str], str | None]:
        applied = await store.migrate()  # opened without migrating, so this reports what it applied
        if any(k.agent == LOCAL_AGENT for k in await store.list_keys()):
            return applied, None
        _, key = await create_key(
            store, agent=LOCAL_AGENT, project="default", scopes=frozenset(SCOPES), by=operator_name()
        )
        return applied, key

    applied, key = _with_store(config, action, migrate=False)
    if key is None and not created_policy and (store_existed and not applied):
        print(f"Already initialised: {config.database} and {config.policy_path}; nothing changed.")
        return 0
    print(f"Database: {config.database}" + (" (created)" if not store_existed else ""))
    print(f"Policy:   {config.policy_path}" + (" (default written)" if created_policy else " (kept)"))
    if key is not None:
        path = local_key_path(config)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT; the key must not be readable by others
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        print(f"Agent '{LOCAL_AGENT}' key (shown once; a copy for `make run` is in {path}, mode 0600):")
        print(key)
    return 0


def not_initialised(config: Config) -> str:
    """Why `serve` refuses a database nobody set up, and what to do instead."""
    return (
        f"No gateway database at {config.database}: a server started on it would know no keys and refuse "
        "every call. Run `qpu-gateway init` to create it (the database, the default policy and a key for "
        "the agent 'local'), or point this server at the existing database with --db PATH|URL or "
        f"{ENV_DB}=PATH|URL. A client that starts the server itself passes it no environment of its own: "
        f"give it one (the MCP Inspector: `-e {ENV_DB}=PATH -e {ENV_KEY}=KEY`; mcp.json: `env`)."
    )


def cmd_paths(args: argparse.Namespace) -> int:
    """Where this command line's flags and environment put the gateway's files (what `serve` would open)."""
    from qpu_gateway.policy.file import overrides_path

    config = _config(args)
    db_from = _source(args, "db", ENV_DB) or ("$XDG_DATA_HOME" if os.environ.get("XDG_DATA_HOME") else "~/.local/share")
    policy_from = _source(args, "policy", ENV_POLICY) or (
        "beside the database" if not config.database.is_postgres else "in the data directory"
    )
    try:
        db_state = "initialised" if store_initialised(config.database) else "missing"
    except StoreError:
        db_state = "unreachable"
    files: dict[str, tuple[object, str, str]] = {
        "database": (config.database, db_state, db_from),
        "policy": (
            config.policy_path,
            _exists(config.policy_path),
            policy_from,
        ),
        "overrides": (
            overrides_path(config.policy_path),
            _exists(overrides_path(config.policy_path)),
            "beside the policy",
        ),
        "local key": (local_key_path(config), _exists(local_key_path(config)), "in the data directory (init)"),
    }
    if args.json:
        print(json.dumps({name: {"path": str(p), "state": st, "from": src} for name, (p, st, src) in files.items()}))
        return 0
    print(_table([[name, str(p), st, src] for name, (p, st, src) in files.items()], ["file", "path", "state", "from"]))
    return 0


def _source(args: argparse.Namespace, flag: str, env: str) -> str | None:
    if getattr(args, flag, None):
        return f"--{flag}"
    return f"${env}" if os.environ.get(env) else None


def _exists(path: Path) -> str:
    return "present" if path.exists() else "missing"


def cmd_serve(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs.ratelimit import RateStorageRefused, storage_uri_for
    from qpu_gateway.jobs.runtime import Gateway
    from qpu_gateway.mcp import transports

    config = _config(args)
    # A server on a database nobody initialised would create it empty and refuse every key,
    # which looks to the agent like a wrong key (a stdio client that passes no environment lands
    # on the default path).
    if not store_initialised(config.database):
        raise CliError(not_initialised(config))
    try:
        storage_uri_for(config)
    except RateStorageRefused as exc:
        raise CliError(str(exc)) from None
    try:
        serving = "stdio" if args.transport == "stdio" else f"{args.transport} {args.host}:{args.port}"
        gateway = Gateway(config, serving=serving)
    except PolicyFileError as exc:
        raise CliError(str(exc)) from None
    if args.transport != "stdio":
        _print_connect(config, args)
    front: transports.Front | None = None
    if args.transport != "stdio":  # the console is served over HTTP only: a stdio start never loads it
        from qpu_gateway.ops.console.serve import in_front

        front = in_front
    transports.run(gateway, transport=args.transport, host=args.host, port=args.port, front=front)
    return 0


def _print_connect(config: Config, args: argparse.Namespace) -> None:
    host = f"[{args.host}]" if ":" in args.host else args.host
    path = "/mcp" if args.transport == "http" else "/sse"
    url = f"http://{host}:{args.port}{path}"
    kind = "Streamable HTTP" if args.transport == "http" else "SSE"
    key = None
    if args.show_key and local_key_path(config).exists():
        key = local_key_path(config).read_text(encoding="utf-8").strip()
    shown = key or "<your key: qpu-gateway keys create --agent NAME>"
    client = {
        "mcpServers": {
            "qpu-gateway": {
                "type": "http" if args.transport == "http" else "sse",
                "url": url,
                "headers": {"Authorization": f"Bearer {shown}"},
            }
        }
    }
    print(f"qpu-gateway {__version__} serving {kind} at {url}")
    print(f"Key for agent '{LOCAL_AGENT}': {shown}")
    print("Claude Code (user-wide):")
    print(
        f"  claude mcp add --scope user --transport {client['mcpServers']['qpu-gateway']['type']} qpu-gateway "
        f'{url} --header "Authorization: Bearer {shown}"'
    )
    print("Client config (mcp.json, Claude Desktop, the MCP Inspector's 'Authorization' header):")
    print(json.dumps(client, indent=2))
    base = f"http://{host}:{args.port}"
    print(f"Operator console: {base}/console (sign-in: qpu-gateway operators create NAME --role admin)")
    print(f"Prometheus metrics: {base}/metrics (loopback peers, or the bearer of $QPU_GATEWAY_METRICS_TOKEN)")
    print("Press Ctrl-C to stop.", flush=True)


def cmd_keys_create(args: argparse.Namespace) -> int:
    config = _config(args)
    scopes = parse_scopes(args.scopes)

    async def action(store: Store) -> str:
        _, key = await create_key(
            store, agent=args.agent, project=args.project, scopes=scopes, ttl_s=args.ttl, by=operator_name()
        )
        return key

    print(_with_store(config, action))
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    keys = _with_store(_config(args), lambda store: store.list_keys())
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "agent": k.agent,
                        "project": k.project,
                        "scopes": sorted(k.scopes),
                        "created_at": k.created_at,
                        "expires_at": k.expires_at,
                        "revoked_at": k.revoked_at,
                        "last_used_at": k.last_used_at,
                    }
                    for k in keys
                ],
                indent=1,
            )
        )
        return 0
    now = time.time()
    rows = [
        [
            k.id,
            k.agent,
            k.project,
            ",".join(sorted(k.scopes)),
            _when(k.created_at),
            _when(k.expires_at),
            _when(k.last_used_at),
            ("revoked" if k.revoked_at else ("expired" if k.expires_at and k.expires_at <= now else "active"))
            + (" (agent paused)" if k.agent_pause and not k.revoked_at else ""),
        ]
        for k in keys
    ]
    print(_table(rows, ["id", "agent", "project", "scopes", "created", "expires", "last used", "status"]))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from qpu_gateway.keys import revoke_key

    revoked = _with_store(_config(args), lambda store: revoke_key(store, args.id, by=operator_name()))
    if not revoked:
        raise CliError(f"No active key with id {args.id!r} (see `qpu-gateway keys list`).")
    print(f"Revoked key {args.id}; calls with it are refused from now on, in every process.")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    from qpu_gateway.keys import rotate_key

    async def action(store: Store) -> str:
        try:
            return await rotate_key(store, args.id, by=operator_name())
        except ValueError as exc:
            raise CliError(f"{exc} (see `qpu-gateway keys list`).") from None

    print(_with_store(_config(args), action))
    return 0


def cmd_operators_create(args: argparse.Namespace) -> int:
    """`operators create NAME --role ROLE`: the password from a prompt (twice), or one line of stdin."""
    from qpu_gateway.ops.console.auth import create_operator

    if sys.stdin.isatty():
        import getpass

        password = getpass.getpass(f"Password for operator {args.name}: ")
        if getpass.getpass("The same again: ") != password:
            raise CliError("the two passwords differ; nothing was created")
    else:
        password = sys.stdin.readline().rstrip("\r\n")

    async def action(store: Store) -> None:
        try:
            await create_operator(store, args.name, args.role, password, by=operator_name())
        except ValueError as exc:
            raise CliError(str(exc)) from None

    _with_store(_config(args), action)
    print(f"Operator {args.name} ({args.role}) created; they sign in at /console.")
    return 0


def cmd_operators_list(args: argparse.Namespace) -> int:
    operators = _with_store(_config(args), lambda store: store.list_operators())
    listed = [
        {"name": o.name, "role": o.role, "created_at": o.created_at, "disabled_at": o.disabled_at} for o in operators
    ]
    if args.json:
        print(json.dumps(listed, indent=1))
        return 0
    rows = [
        [o.name, o.role, _when(o.created_at), "disabled " + _when(o.disabled_at) if o.disabled_at else "enabled"]
        for o in operators
    ]
    print(_table(rows, ["name", "role", "created", "status"]))
    return 0


def cmd_operators_disable(args: argparse.Namespace) -> int:
    from qpu_gateway.ops.console.auth import disable_operator

    async def action(store: Store) -> None:
        try:
            await disable_operator(store, args.name, by=operator_name())
        except ValueError as exc:
            raise CliError(str(exc)) from None

    _with_store(_config(args), action)
    print(f"Operator {args.name} is disabled: no more sign-ins, and their sessions have ended.")
    return 0


def cmd_console_serve(args: argparse.Namespace) -> int:
    """Serve the operator console alone (installations of stdio servers only)."""
    from qpu_gateway.ops.console.serve import serve_console

    config = _config(args)
    if not store_initialised(config.database):
        raise CliError(not_initialised(config))
    anyio.run(lambda: serve_console(config, host=args.host, port=args.port))
    return 0


def cmd_policy_check(args: argparse.Namespace) -> int:
    from qpu_gateway.policy.file import parse_policy

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    policy = parse_policy(text, path=str(path))
    projects, agents = policy.names
    print(
        f"{path}: valid ({len(projects)} project section(s), {len(agents)} agent section(s), "
        f"{len(policy.prices)} prices)"
    )
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs.service import effective_policy
    from qpu_gateway.policy.file import load_policy

    config = _config(args)
    project = args.project
    if project is None:
        keys = _with_store(config, lambda store: store.list_keys())
        projects = sorted({k.project for k in keys if k.agent == args.agent})
        project = projects[0] if len(projects) == 1 else "default"
    view = effective_policy(load_policy(config.policy_path), agent=args.agent, project=project, scopes=frozenset())
    print(json.dumps(view.model_dump(mode="json", exclude={"scopes"}), indent=1))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs.service import quota_usage
    from qpu_gateway.policy.file import load_policy
    from qpu_gateway.policy.quotas import render

    config = _config(args)
    policy = load_policy(config.policy_path)

    async def action(store: Store) -> list[tuple[str, list[Any]]]:
        keys = await store.list_keys()
        pairs = sorted(
            {
                (k.agent, k.project)
                for k in keys
                if (args.project in (None, k.project)) and (args.agent in (None, k.agent))
            }
        )
        out = []
        for agent, project in pairs:
            rules = policy.rules_for(agent=agent, project=project)
            lines, counts = await quota_usage(store, rules, agent=agent, project=project)
            out.append(
                (f"agent {agent} (project {project}), queued {counts['agent'][0]}, running {counts['agent'][1]}", lines)
            )
        return out

    for title, lines in _with_store(config, action):
        print(title)
        rows = [
            [
                q.scope,
                q.dimension,
                q.period,
                "-" if q.limit is None else render(q.dimension, q.limit),
                render(q.dimension, q.committed),
                render(q.dimension, q.reserved),
                "-" if q.remaining is None else render(q.dimension, q.remaining),
            ]
            for q in lines
            if q.limit is not None or q.committed or q.reserved
        ]
        print(_table(rows, ["scope", "dimension", "period", "limit", "committed", "reserved", "remaining"]))
        print()
    return 0


def cmd_quota_set(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs.policy_overrides import set_quota

    config = _config(args)
    level = ["defaults"] if args.defaults else (["projects", args.project] if args.project else ["agents", args.agent])
    quota, _, key = args.key.partition(".")
    value = None if args.value == "none" else args.value
    try:
        path = set_quota(config.policy_path, level=level, quota=quota, key=key, value=value)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    by = operator_name()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    entry = operator_entry(
        "quota.set",
        by,
        detail=f"{'.'.join(level)}.{args.key} = {args.value} set by operator {by} in {path} (sha256 {digest})",
        agent=args.agent,
        project=args.project,
    )
    _with_store(config, lambda store: store.append_audit(entry, time.time()))
    print(f"Set {'.'.join(level)}.{args.key} = {args.value} in {path}; running gateways apply it within a second.")
    return 0


def cmd_approvals_list(args: argparse.Namespace) -> int:
    from qpu_gateway.policy.pricing import format_usd

    jobs = _with_store(_config(args), lambda store: store.pending_approvals())
    rows = [
        [
            j.id,
            j.agent,
            j.project,
            j.backend,
            str(j.shots),
            str(j.n_circuits),
            format_usd(j.estimate_micro_usd) if j.pricing_known else "unknown",
            j.approval_level or "-",
            _when(j.approval_expires_at),
            j.name or "",
        ]
        for j in jobs
    ]
    print(_table(rows, ["id", "agent", "project", "backend", "shots", "circuits", "cost", "level", "expires", "name"]))
    return 0


def cmd_approvals_decide(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs import approvals

    by = operator_name()

    async def action(store: Store) -> Any:
        try:
            if args.approvals_command == "approve":
                job = await approvals.approve(store, args.id, by=by)
            else:
                job = await approvals.deny(store, args.id, by=by, reason=args.reason)
        except approvals.ApprovalError as exc:
            raise CliError(str(exc)) from None
        return job, await store.pause_of("agent", job.agent), await store.pause_of("backend", job.backend)

    job, agent_pause, backend_pause = _with_store(_config(args), action)
    verb = "approved" if args.approvals_command == "approve" else "denied"
    print(f"Job {job.id} is now {job.state.value} ({verb} by operator {by}).")
    if job.state is JobState.QUEUED and (agent_pause or backend_pause):
        held = f"agent {job.agent}" if agent_pause else f"backend {job.backend}"
        print(f"It waits in the queue while {held} is paused.")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    state = JobState(args.state) if args.state else None

    async def action(store: Store) -> Any:
        return await store.list_jobs(agent=args.agent, state=state, limit=args.limit, before_seq=None)

    jobs = _with_store(_config(args), action)
    rows = [
        [
            j.id,
            j.agent,
            j.backend,
            j.state.value,
            str(j.shots),
            str(j.n_circuits),
            str(j.attempts),
            _when(j.created_at),
            j.name or "",
        ]
        for j in jobs
    ]
    print(_table(rows, ["id", "agent", "backend", "state", "shots", "circuits", "attempts", "created", "name"]))
    return 0


def cmd_jobs_cancel(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs import cancellation
    from qpu_gateway.jobs.states import TERMINAL

    config = _config(args)
    reason = args.reason.strip()
    if not reason:
        raise CliError("--reason must say why: the job's agent is told it.")
    by = operator_name()

    async def action(store: Store) -> Any:
        job = await store.get_job(args.id)
        if job is None:
            raise CliError(f"No job {args.id!r} (see `qpu-gateway jobs list`).")
        if job.state in TERMINAL:
            raise CliError(f"Job {job.id} already ended ({job.state.value}); there is nothing to cancel.")
        done = await cancellation.cancel_job(
            store, job, cancellation.Canceller.operator(by, reason[:500]), providers=_providers(config)
        )
        if done is None:
            latest = await store.get_job(job.id)
            raise CliError(f"Job {job.id} ended ({latest.state.value if latest else 'gone'}) before it was cancelled.")
        return done

    done = _with_store(config, action)
    print(
        f"Cancelled job {done.job.id} of agent {done.job.agent} (it was {done.was.value} on {done.job.backend}): "
        f"{done.at_provider}. Its reservation is released; its agent reads the reason in get_job."
    )
    return 0


def _providers(config: Config) -> Any:
    """The provider adapters, to cancel a job at its provider from this command (SDKs load only if used)."""
    from qpu_gateway.jobs.providers import Providers

    return Providers(config)


def cmd_pause(args: argparse.Namespace) -> int:
    """`agents pause NAME` and `backends pause ID`."""
    from qpu_gateway.jobs import pauses

    kind = args.pause_kind
    by = operator_name()
    config = _config(args)

    async def action(store: Store) -> tuple[Any, bool, list[str]]:
        try:
            pause, new = await pauses.pause(store, kind, args.name, by=by, reason=args.reason)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        cancelled = await _cancel_running(store, config, pause.name, by, args.reason) if args.cancel_running else []
        return pause, new, cancelled

    pause, new, cancelled = _with_store(config, action)
    what = f"Agent {pause.name}" if kind == "agent" else f"Backend {pause.name}"
    if not new:
        print(f"{what} was already paused by {pause.paused_by} since {_when(pause.paused_at)}; nothing changed.")
    elif kind == "agent":
        print(
            f"Agent {pause.name} is paused: its calls are refused (agent_paused) and its queued jobs held, in every "
            f"process, until `qpu-gateway agents resume {pause.name}`."
        )
    else:
        print(
            f"Backend {pause.name} is paused: no job of it is claimed or admitted (backend_paused) until "
            f"`qpu-gateway backends resume {pause.name}`; jobs already at the provider finish."
        )
    for line in cancelled:
        print(line)
    return 0


async def _cancel_running(store: Store, config: Config, agent: str, by: str, reason: str | None) -> list[str]:
    """`agents pause --cancel-running`: cancel the agent's jobs already held by workers, at their provider too."""
    from qpu_gateway.jobs import cancellation

    canceller = cancellation.Canceller.operator(by, f"its agent was paused{': ' + reason if reason else ''}")
    providers = _providers(config)
    lines = []
    for state in (JobState.SUBMITTING, JobState.RUNNING):
        for job in await store.list_jobs(agent=agent, state=state, limit=10_000, before_seq=None):
            done = await cancellation.cancel_job(store, job, canceller, providers=providers)
            if done is not None:
                lines.append(f"Cancelled job {job.id} (it was {state.value} on {job.backend}): {done.at_provider}.")
    return lines


def cmd_resume(args: argparse.Namespace) -> int:
    """`agents resume NAME` and `backends resume ID`."""
    from qpu_gateway.jobs import pauses

    kind = args.pause_kind

    async def action(store: Store) -> Any:
        try:
            return await pauses.resume(store, kind, args.name, by=operator_name())
        except pauses.PauseError as exc:
            raise CliError(str(exc)) from None

    lifted = _with_store(_config(args), action)
    now = "its calls are served and its queued jobs run" if kind == "agent" else "its jobs are claimed and admitted"
    since = f"paused by {lifted.paused_by} since {_when(lifted.paused_at)}"
    print(f"{kind.capitalize()} {lifted.name} is resumed (it was {since}): {now}.")
    return 0


def cmd_agents_list(args: argparse.Namespace) -> int:
    async def action(store: Store) -> tuple[Any, ...]:
        return await store.list_keys(), await store.pauses("agent"), await store.active_job_counts("agent")

    keys, paused, counts = _with_store(_config(args), action)
    now = time.time()
    pause_of = {p.name: p for p in paused}
    agents = sorted({k.agent for k in keys} | set(pause_of) | set(counts))
    listed = []
    for agent in agents:
        own = [k for k in keys if k.agent == agent]
        active = [k for k in own if not k.revoked_at and not (k.expires_at and k.expires_at <= now)]
        pause = pause_of.get(agent)
        waiting, running = counts.get(agent, (0, 0))
        listed.append(
            {
                "agent": agent,
                "projects": sorted({k.project for k in own}),
                "active_keys": len(active),
                "waiting_jobs": waiting,
                "running_jobs": running,
                "paused": pause is not None,
                **_pause_fields(pause),
            }
        )
    return _print_listing(args, listed, ["agent", "projects", "active_keys", "waiting_jobs", "running_jobs"])


def cmd_backends_list(args: argparse.Namespace) -> int:
    async def action(store: Store) -> tuple[Any, ...]:
        return await store.pauses("backend"), await store.active_job_counts("backend")

    paused, counts = _with_store(_config(args), action)
    pause_of = {p.name: p for p in paused}
    listed = [
        {
            "backend": backend,
            "waiting_jobs": counts.get(backend, (0, 0))[0],
            "running_jobs": counts.get(backend, (0, 0))[1],
            "paused": backend in pause_of,
            **_pause_fields(pause_of.get(backend)),
        }
        for backend in sorted(set(pause_of) | set(counts))
    ]
    return _print_listing(args, listed, ["backend", "waiting_jobs", "running_jobs"])


def _pause_fields(pause: Any) -> dict[str, Any]:
    if pause is None:
        return {"paused_by": None, "paused_at": None, "reason": None}
    return {"paused_by": pause.paused_by, "paused_at": pause.paused_at, "reason": pause.reason}


def _print_listing(args: argparse.Namespace, listed: list[dict[str, Any]], columns: list[str]) -> int:
    if args.json:
        print(json.dumps(listed, indent=1))
        return 0
    rows = [
        [
            *(", ".join(r[c]) if isinstance(r[c], list) else str(r[c]) for c in columns),
            "paused" if r["paused"] else "active",
            r["paused_by"] or "",
            _when(r["paused_at"]) if r["paused"] else "",
            r["reason"] or "",
        ]
        for r in listed
    ]
    header = [c.replace("_jobs", "").replace("_", " ") for c in columns]
    print(_table(rows, [*header, "status", "paused by", "since", "reason"]))
    return 0


def cmd_notifications_list(args: argparse.Namespace) -> int:
    """The outbox: the newest notifications, pending, delivered or dead (given up), newest first."""

    async def action(store: Store) -> Any:
        return await store.notifications(status=args.status, limit=args.lines)

    rows = _with_store(_config(args), action)
    if args.json:
        listed = [
            {
                "id": n.id,
                "event": n.event,
                "hook": n.hook,
                "status": n.status,
                "attempts": n.attempts,
                "created_at": _when(n.created_at),
                "next_attempt_at": _when(n.next_attempt_at) if n.status == "pending" else None,
                "finished_at": _when(n.finished_at),
                "agent": n.agent,
                "project": n.project,
                "job_id": n.job_id,
                "last_error": n.last_error,
            }
            for n in rows
        ]
        print(json.dumps(listed, indent=1))
    elif not rows:
        print("No notifications" + (f" {args.status}." if args.status else "."))
    else:
        table = [
            [
                str(n.id),
                n.event,
                n.hook,
                n.status,
                str(n.attempts),
                _when(n.created_at),
                _when(n.next_attempt_at) if n.status == "pending" else _when(n.finished_at),
                n.job_id or n.agent or "-",
                (n.last_error or "")[:80],
            ]
            for n in rows
        ]
        print(_table(table, ["id", "event", "hook", "status", "tries", "created", "next/ended", "about", "last error"]))
    return 0


def cmd_processes(args: argparse.Namespace) -> int:
    """The gateway processes serving this database and the policy each runs; exit 1 if they differ."""
    from qpu_gateway.jobs.processes import LIVE_FOR_S, disagreement, short

    async def action(store: Store) -> Any:
        return await store.processes(time.time() - LIVE_FOR_S)

    live = _with_store(_config(args), action)
    differs = disagreement(live)
    majority = max(
        {r.policy_stamp for r in live}, key=lambda stamp: sum(r.policy_stamp == stamp for r in live), default=None
    )
    listed = [
        {
            "id": r.id,
            "host": r.host,
            "pid": r.pid,
            "serving": r.serving,
            "started_at": r.started_at,
            "seen_at": r.seen_at,
            "policy_path": r.policy_path,
            "policy_sha256": r.policy_sha256,
            "overrides_sha256": r.overrides_sha256,
            "policy_error": r.policy_error,
            "same_policy": r.policy_stamp == majority,
        }
        for r in live
    ]
    if args.json:
        print(json.dumps({"agree": differs is None, "processes": listed}, indent=1))
    elif not listed:
        print(f"No gateway process has reported to this database in the last {LIVE_FOR_S:g} s.")
    else:
        rows = [
            [
                f"{r['host']}:{r['pid']}",
                r["serving"],
                _when(r["started_at"]),
                short(r["policy_sha256"]),
                short(r["overrides_sha256"]),
                "" if r["same_policy"] else "DIFFERS",
                "file refused: " + r["policy_error"] if r["policy_error"] else "",
            ]
            for r in listed
        ]
        print(_table(rows, ["process", "serving", "since", "policy", "overrides", "", "note"]))
        print(differs or f"All {len(listed)} process(es) run the same policy.")
    return 0 if differs is None else 1


def cmd_metrics_show(args: argparse.Namespace) -> int:
    """Print what `metrics serve` would answer a scrape with now (every process's counts, summed)."""
    from qpu_gateway.jobs.policy_source import PolicySource
    from qpu_gateway.telemetry.endpoint import installation_exposition

    config = _config(args)
    source = PolicySource(config.policy_path)

    async def action(store: Store) -> bytes:
        return await installation_exposition(store, lambda: source.current)()

    sys.stdout.write(_with_store(config, action).decode())
    return 0


def cmd_metrics_serve(args: argparse.Namespace) -> int:
    """Serve GET /metrics for the whole installation (every process on this database), for Prometheus."""
    from qpu_gateway.ops.standalone import serve_installation_metrics

    config = _config(args)
    anyio.run(lambda: serve_installation_metrics(config, host=args.host, port=args.port))
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from qpu_gateway.jobs.service import job_view
    from qpu_gateway.jobs.timeline import job_timeline

    async def action(store: Store) -> Any:
        job = await store.get_job(args.id)
        if job is None:
            return None
        return job, await store.audit_tail(limit=1000, job_id=job.id), await job_timeline(store, job, whole=True)

    found = _with_store(_config(args), action)
    if found is None:
        raise CliError(f"No job {args.id!r}.")
    job, audit, timeline = found
    view = job_view(job, full=True).model_dump(mode="json")
    view["timeline"] = timeline.model_dump(mode="json")["events"]
    view.update(
        agent=job.agent,
        project=job.project,
        key_id=job.key_id,
        runs=job.runs,
        cancelled_by=job.cancelled_by,
        audit=[
            {
                "at": _when(a.at),
                "tool": a.tool,
                "decision": a.decision,
                "code": a.error_code,
                "operator": a.operator,
                "detail": a.detail,
            }
            for a in audit
        ],
    )
    print(json.dumps(view, indent=1))
    return 0


def cmd_audit_tail(args: argparse.Namespace) -> int:
    config = _config(args)

    async def read(store: Store, after: int | None) -> list[Any]:
        if after is None:  # the first read: the newest rows
            return await store.audit_tail(limit=args.lines, job_id=args.job, agent=args.agent)
        rows: list[Any] = []  # later reads: every row since, oldest first, however many arrived
        while batch := await store.audit_since(after_seq=after, limit=500, job_id=args.job, agent=args.agent):
            rows += batch
            after = batch[-1].seq
        return rows

    after: int | None = None
    while True:
        for r in _with_store(config, functools.partial(read, after=after)):
            print(
                f"{r.seq:>6} {_when(r.at)} agent={r.agent or '-'} key={r.key_id or '-'}"
                f"{' operator=' + shlex.quote(r.operator) if r.operator else ''} {r.tool} "
                f"{r.decision}{' ' + r.error_code if r.error_code else ''}"
                f"{' job=' + r.job_id if r.job_id else ''}{' args=' + r.args_hash[:12] if r.args_hash else ''}"
                f"{' ' + repr(r.detail) if r.detail else ''}",
                flush=True,
            )
            after = r.seq
        if not args.follow:
            return 0
        after = after or 0
        time.sleep(1.0)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from qpu_gateway.audit.chain import verify_log

    report = _with_store(_config(args), functools.partial(verify_log, anchor=args.anchor))
    if report.broken is not None:
        print(f"chain broken at seq {report.broken.seq}: {report.broken.message}")
        return 1
    print(f"{report.rows} rows, chain intact")
    if report.legacy_rows:
        print(f"{report.legacy_rows} rows written before the chain existed carry no hash (seq 1-{report.legacy_rows})")
    if report.head_seq is not None:
        print(f"head {report.head_seq}:{report.head_hash}  (keep it elsewhere; check later with --anchor)")
    return 0


def cmd_audit_export(args: argparse.Namespace) -> int:
    after_seq, from_time = args.since

    async def action(store: Store) -> int:
        written = 0
        async with aclosing(store.audit_pages(after_seq=after_seq)) as pages:
            async for page in pages:
                lines = [
                    json.dumps(exported(row), separators=(",", ":")) + "\n"
                    for row in page
                    if from_time is None or row.at >= from_time
                ]
                sys.stdout.write("".join(lines))
                sys.stdout.flush()
                written += len(lines)
        return written

    _with_store(_config(args), action)
    return 0


def _since(text: str) -> tuple[int, float | None]:
    """`--since`: a seq (rows after it) or an ISO 8601 time (rows at or after it; UTC unless it says)."""
    if text.isdigit():
        return int(text), None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a seq (1200) or an ISO time (2026-11-25T19:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return 0, moment.timestamp()


def _anchor(text: str) -> tuple[int, str]:
    seq, _, digest = text.partition(":")
    if not seq.isdigit() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise argparse.ArgumentTypeError("expected SEQ:HASH as printed by 'audit verify' (head 42:9f86d0...)")
    return int(seq), digest


def cmd_db_copy(args: argparse.Namespace) -> int:
    """`db copy --from LOCATION --to LOCATION`: progress as JSON lines on stderr, a summary on stdout."""
    from qpu_gateway.config import Database
    from qpu_gateway.ops.db_copy import CopyRefused, copy_installation

    source = Database.parse(args.source) if args.source else _config(args).database
    target = Database.parse(args.target)
    log = logging.getLogger("qpu_gateway.ops.db_copy")
    log.info("copying %s to %s", source, target, extra={"source": source.shown, "target": target.shown})
    try:
        report = anyio.run(functools.partial(copy_installation, source, target, by=operator_name()))
    except (CopyRefused, StoreError) as exc:
        log.error("not copied: %s", exc, extra={"source": source.shown, "target": target.shown})
        return 1
    made = []
    if report.created:
        made.append("created")
    if report.migrations:
        made.append(f"{len(report.migrations)} migrations applied")
    print(
        f"Copied {source} to {target}{' (' + ', '.join(made) + ')' if made else ''} in {report.seconds:.1f} s, "
        "in one transaction:"
    )
    width = max(len(table) for table in report.rows)
    for table, n in report.rows.items():
        print(f"  {table.ljust(width)}  {n:>9}")
    print(f"Audit chain verified on the way; the db.copy row continues it: head {report.head_seq}:{report.head_hash}")
    print("Next: with every gateway stopped, point them at the copy and start them:")
    print(f"  {ENV_DB}={target}  (or --db), then `qpu-gateway audit verify` there")
    if target.is_postgres:
        print("  A PostgreSQL store needs shared rate limits: QPU_GATEWAY_RATE_STORAGE=async+redis://HOST:6379")
    print(
        "The policy file and local.key are files, not rows: copy them to where gateways on the copy look "
        f"(`qpu-gateway paths --db {target}`), or set {ENV_POLICY}."
    )
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    """`db migrate`: apply this version's pending migrations (what a gateway does when it starts)."""
    config = _config(args)
    if not store_initialised(config.database):
        raise CliError(not_initialised(config))
    applied = _with_store(config, lambda store: store.migrate(), migrate=False)
    if applied:
        print(f"Applied {', '.join(applied)} to {config.database}.")
    else:
        print(f"{config.database} is up to date; nothing applied.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from qpu_gateway.ops.demo import run_demo

    return run_demo(keep=args.keep)


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        help="the database: a SQLite path or sqlite:///PATH, or a postgresql:// URL "
        "(default: $QPU_GATEWAY_DB or $XDG_DATA_HOME/qpu-gateway/gateway.db)",
    )
    common.add_argument(
        "--data-dir",
        default=argparse.SUPPRESS,
        help="folder of the default policy and local.key (default: $QPU_GATEWAY_DATA_DIR, else the SQLite "
        "file's folder, or $XDG_DATA_HOME/qpu-gateway/postgresql/HOST-PORT-DBNAME for PostgreSQL)",
    )
    common.add_argument(
        "--policy",
        default=argparse.SUPPRESS,
        help="policy TOML (default: $QPU_GATEWAY_POLICY or policy.toml in the data directory)",
    )
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error"],
        help="log level on stderr (default info)",
    )

    parser = argparse.ArgumentParser(
        prog="qpu-gateway",
        parents=[common],
        description="An MCP server that gives agents safe, budgeted, audited access to quantum computers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create the database, default policy and the 'local' key")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("paths", parents=[common], help="where the database, policy and local key are (flags, env)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_paths)

    p = sub.add_parser("serve", parents=[common], help="serve MCP over stdio, Streamable HTTP or SSE")
    p.add_argument("--transport", choices=["stdio", "http", "sse"], default="stdio")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"HTTP/SSE bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP/SSE port (default {DEFAULT_PORT})")
    p.add_argument(
        "--show-key", action="store_true", help="print the 'local' agent's key from local.key in the connection banner"
    )
    p.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", parents=[common], help="create, list and revoke agent keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    p = ksub.add_parser("create", parents=[common], help="create a key; prints only the key")
    p.add_argument("--agent", required=True)
    p.add_argument("--project", default="default")
    p.add_argument("--scopes", default=",".join(SCOPES), help=f"comma-separated subset of {','.join(SCOPES)}")
    p.add_argument("--ttl", type=_ttl, default=None, help="expire after e.g. 24h or 30d (default: never)")
    p.set_defaults(func=cmd_keys_create)
    p = ksub.add_parser("list", parents=[common], help="list keys (never their secrets)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_list)
    p = ksub.add_parser("revoke", parents=[common], help="revoke a key at once, in every process")
    p.add_argument("id")
    p.set_defaults(func=cmd_keys_revoke)
    p = ksub.add_parser("rotate", parents=[common], help="new secret for a key; the old one stops now")
    p.add_argument("id")
    p.set_defaults(func=cmd_keys_rotate)

    ops = sub.add_parser("operators", parents=[common], help="people who sign in to the console, and their roles")
    osub = ops.add_subparsers(dest="operators_command", required=True, metavar="ACTION")
    p = osub.add_parser("create", parents=[common], help="a new operator; the password from a prompt or stdin")
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=["viewer", "approver", "admin"])
    p.set_defaults(func=cmd_operators_create)
    p = osub.add_parser("list", parents=[common], help="operators and their roles (never a password)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_operators_list)
    p = osub.add_parser("disable", parents=[common], help="no more sign-ins; their sessions end now")
    p.add_argument("name")
    p.set_defaults(func=cmd_operators_disable)

    con = sub.add_parser("console", parents=[common], help="the operator console in a browser")
    csub = con.add_subparsers(dest="console_command", required=True, metavar="ACTION")
    p = csub.add_parser("serve", parents=[common], help="serve /console alone (for installations of stdio servers)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=8766, help="port (default 8766)")
    p.set_defaults(func=cmd_console_serve)

    pol = sub.add_parser("policy", parents=[common], help="check a policy file, show an agent's effective policy")
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    p = psub.add_parser("check", parents=[common], help="validate a policy file (exit 1 with line and reason)")
    p.add_argument("file")
    p.set_defaults(func=cmd_policy_check)
    p = psub.add_parser("show", parents=[common], help="the effective policy of one agent, as JSON")
    p.add_argument("--agent", required=True)
    p.add_argument("--project", help="the agent's project (default: the project of its keys)")
    p.set_defaults(func=cmd_policy_show)

    p = sub.add_parser("usage", parents=[common], help="quota use per agent: limit, committed, reserved, remaining")
    p.add_argument("--project")
    p.add_argument("--agent")
    p.set_defaults(func=cmd_usage)

    quota = sub.add_parser("quota", parents=[common], help="change a quota without editing the policy file")
    qsub = quota.add_subparsers(dest="quota_command", required=True, metavar="ACTION")
    p = qsub.add_parser("set", parents=[common], help="set a quota at one level, e.g. agent_quota.cost_usd.day 20")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--agent")
    who.add_argument("--project")
    who.add_argument("--defaults", action="store_true")
    p.add_argument(
        "key",
        help="agent_quota|project_quota . cost_usd|shots|qpu_seconds . day|month|total, "
        "or .running_jobs / .queued_jobs",
    )
    p.add_argument("value", help="the new limit (dollars for cost_usd), or 'none' to remove it")
    p.set_defaults(func=cmd_quota_set)

    appr = sub.add_parser("approvals", parents=[common], help="jobs waiting for an operator's yes")
    apsub = appr.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")
    p = apsub.add_parser("list", parents=[common], help="pending approvals")
    p.set_defaults(func=cmd_approvals_list)
    p = apsub.add_parser("approve", parents=[common], help="queue a held job")
    p.add_argument("id")
    p.set_defaults(func=cmd_approvals_decide)
    p = apsub.add_parser("deny", parents=[common], help="reject a held job, releasing its reservation")
    p.add_argument("id")
    p.add_argument("--reason")
    p.set_defaults(func=cmd_approvals_decide)

    jobs = sub.add_parser("jobs", parents=[common], help="list and inspect jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p = jsub.add_parser("list", parents=[common], help="newest jobs first")
    p.add_argument("--agent")
    p.add_argument("--state", choices=[s.value for s in JobState])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("show", parents=[common], help="one job, its result and its audit trail")
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_show)

    p = jsub.add_parser("cancel", parents=[common], help="cancel any agent's job, at its provider too")
    p.add_argument("id")
    p.add_argument("--reason", required=True, help="why (the job's agent reads it in get_job)")
    p.set_defaults(func=cmd_jobs_cancel)

    for kind, noun, arg in (("agent", "agents", "name"), ("backend", "backends", "id")):
        group = sub.add_parser(
            noun,
            parents=[common],
            help="pause (kill switch) or resume an agent, list agents"
            if kind == "agent"
            else "pause (drain) or resume a backend, list backends with jobs or pauses",
        )
        gsub = group.add_subparsers(dest=f"{noun}_command", required=True, metavar="ACTION")
        effect = "refuse its calls, hold its queued jobs" if kind == "agent" else "claim and admit none of its jobs"
        p = gsub.add_parser("pause", parents=[common], help=f"{effect}, in every process")
        p.add_argument("name", metavar=arg.upper())
        p.add_argument("--reason", help="why (shown to the agent, and in the audit log)")
        if kind == "agent":
            p.add_argument(
                "--cancel-running",
                action="store_true",
                help="also cancel its jobs that workers already hold (at their provider too)",
            )
        else:
            p.set_defaults(cancel_running=False)
        p.set_defaults(func=cmd_pause, pause_kind=kind)
        p = gsub.add_parser("resume", parents=[common], help=f"lift the {kind}'s pause")
        p.add_argument("name", metavar=arg.upper())
        p.set_defaults(func=cmd_resume, pause_kind=kind)
        p = gsub.add_parser(
            "list",
            parents=[common],
            help="agents with keys, jobs or a pause: keys, jobs, pause"
            if kind == "agent"
            else "backends with waiting or running jobs, or paused: jobs, pause",
        )
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=cmd_agents_list if kind == "agent" else cmd_backends_list)

    p = sub.add_parser(
        "processes",
        parents=[common],
        help="the gateway processes (replicas) on this database and their policy hashes; exit 1 if they differ",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_processes)

    notes = sub.add_parser("notifications", parents=[common], help="the webhook outbox: what was sent, what waits")
    nsub = notes.add_subparsers(dest="notifications_command", required=True, metavar="ACTION")
    p = nsub.add_parser("list", parents=[common], help="the newest notifications, newest first")
    p.add_argument("--status", choices=["pending", "delivered", "dead"])
    p.add_argument("-n", "--lines", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_notifications_list)

    metrics = sub.add_parser("metrics", parents=[common], help="Prometheus metrics of every process on this database")
    msub = metrics.add_subparsers(dest="metrics_command", required=True, metavar="ACTION")
    p = msub.add_parser("show", parents=[common], help="print the exposition once (counters summed over processes)")
    p.set_defaults(func=cmd_metrics_show)
    p = msub.add_parser(
        "serve", parents=[common], help="serve GET /metrics for Prometheus (installations of stdio servers)"
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=9464, help="port (default 9464)")
    p.set_defaults(func=cmd_metrics_serve)

    audit = sub.add_parser("audit", parents=[common], help="read the audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = asub.add_parser("tail", parents=[common], help="the latest audit rows")
    p.add_argument("-n", "--lines", type=int, default=20)
    p.add_argument("--job")
    p.add_argument("--agent")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new rows")
    p.set_defaults(func=cmd_audit_tail)
    p = asub.add_parser("verify", parents=[common], help="check the audit hash chain (exit 1 at the first broken link)")
    p.add_argument(
        "--anchor",
        type=_anchor,
        metavar="SEQ:HASH",
        help="a head printed by an earlier verify: that row must still carry that hash",
    )
    p.set_defaults(func=cmd_audit_verify)
    p = asub.add_parser("export", parents=[common], help="audit rows with their hashes, one JSON object per line")
    p.add_argument("--format", choices=["jsonl"], default="jsonl")
    p.add_argument(
        "--since",
        type=_since,
        default=(0, None),
        metavar="SEQ_OR_ISO_TIME",
        help="only rows after this seq, or at or after this time (ISO 8601, UTC unless it has an offset)",
    )
    p.set_defaults(func=cmd_audit_export)

    dbs = sub.add_parser("db", parents=[common], help="move an installation to another database, apply migrations")
    dsub = dbs.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    p = dsub.add_parser(
        "copy",
        parents=[common],
        help="copy keys, pauses, jobs, ledger and the audit chain into an empty database (all or nothing)",
    )
    p.add_argument(
        "--from",
        dest="source",
        metavar="LOCATION",
        help="the database to copy: a path, sqlite:///PATH or postgresql://... (default: --db / $QPU_GATEWAY_DB)",
    )
    p.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="LOCATION",
        help="an empty or new database: created and migrated if needed",
    )
    p.set_defaults(func=cmd_db_copy)
    p = dsub.add_parser("migrate", parents=[common], help="apply this version's pending migrations to --db")
    p.set_defaults(func=cmd_db_migrate)

    p = sub.add_parser(
        "demo", parents=[common], help="a scripted agent session over stdio against a throw-away database"
    )
    p.add_argument("--keep", action="store_true", help="keep the throw-away directory and print its path")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(getattr(args, "log_level", "info"))
    serving = args.command == "serve"
    if serving:  # a server's stderr is read by machines: every line one JSON object
        logs.structured_streams(stdout=args.transport == "stdio")
    try:
        result: int = args.func(args)
        return result
    except (CliError, StoreError, PolicyFileError) as exc:
        _report(serving, str(exc))
        return 1
    except ValueError as exc:  # bad names or scopes from the command line
        _report(serving, str(exc))
        return 2
    except KeyboardInterrupt:
        return 0


def _report(serving: bool, message: str) -> None:
    if serving:
        logging.getLogger("qpu_gateway.serve").error("cannot serve: %s", message)
    else:
        print(f"qpu-gateway: error: {logs.redact(message)}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
