"""The console's routes (Starlette), mounted at /console: pages for reading, forms for acting.

Every page needs a signed-in operator; every POST also needs the session's CSRF token and the role
its act needs (viewer reads, approver also decides held jobs, admin everything). Acts go through
the same service functions as the CLI, which write their audit rows naming the operator.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

import anyio
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qpu_gateway.audit.chain import exported, verify_log
from qpu_gateway.jobs import approvals, pauses
from qpu_gateway.jobs.policy_source import PolicySource
from qpu_gateway.jobs.providers import Providers
from qpu_gateway.jobs.states import TERMINAL, JobState
from qpu_gateway.keys import SCOPES, create_key, parse_scopes, revoke_key, rotate_key
from qpu_gateway.ops.console import pages
from qpu_gateway.ops.console.auth import AuthError, Sessions, SignedIn, may
from qpu_gateway.ops.console.pages import Viewer, h, table, usd, when
from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import JobRecord

log = logging.getLogger(__name__)

COOKIE = "qpu_console"
LOGIN_COOKIE = "qpu_console_login"  # the login form's CSRF token (double-submit: no session yet)
MAX_FORM = 64 * 1024
TTLS = {"never": None, "1 day": 86400.0, "30 days": 30 * 86400.0, "90 days": 90 * 86400.0}
HEADERS = {
    # Nothing from elsewhere: the gateway runs offline, and a script injected into a page could act.
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


@dataclass
class Console:
    """What the console acts on: the store, the policy in force, the providers, and this process's job
    events where it runs inside a gateway (so an approval wakes the agent's wait_for_job at once)."""

    store: Store
    sessions: Sessions
    policy: PolicySource
    providers: Providers
    announce: Callable[[JobRecord], Awaitable[None]] | None = None
    wake: Callable[[], None] | None = None
    breakers: Callable[[], dict[str, str]] | None = None  # this process's breakers (None: not known here)

    @classmethod
    def of(
        cls,
        store: Store,
        strategy: MovingWindowRateLimiter,
        namespace: str,
        policy: PolicySource,
        providers: Providers,
        **extra: Any,
    ) -> Console:
        return cls(store, Sessions(store, strategy, namespace), policy, providers, **extra)

    async def changed(self, job: JobRecord) -> None:
        """Tell this process's waiters and workers (other processes find the change themselves)."""
        if self.announce is not None:
            await self.announce(job)
        if self.wake is not None and job.state is JobState.QUEUED:
            self.wake()


def html(body: str, status: int = 200, **headers: str) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers={**HEADERS, **headers})


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=HEADERS)


def viewer_of(who: SignedIn) -> Viewer:
    return Viewer(who.operator.name, who.operator.role, who.csrf)


async def form_of(request: Request) -> dict[str, str]:
    """An urlencoded form's fields (first value of each); refused when too large."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise AuthError(413, "too_large", "The form is too large.")
    fields = parse_qs(body.decode("utf-8", "replace"), max_num_fields=50, keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def build_app(console: Console) -> Starlette:
    """The console as an ASGI app with its routes under /console."""

    async def signed_in(request: Request) -> SignedIn:
        who = await console.sessions.signed_in(request.cookies.get(COOKIE))
        if who is None:
            raise AuthError(401, "unauthorized", "Sign in first.")
        return who

    def page(render: Callable[[Request, SignedIn], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await render(request, await signed_in(request))
            except AuthError as exc:
                if exc.status == 401:
                    return see_other("/console/login")
                raise

        return endpoint

    def act(
        needed: str, run: Callable[[Request, SignedIn, dict[str, str]], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            who = await signed_in(request)
            fields = await form_of(request)
            from qpu_gateway.ops.console.auth import csrf_ok

            if not csrf_ok(who.session_id, fields.get("csrf")):
                raise AuthError(403, "forbidden", "The form's CSRF token is missing or wrong: reload the page.")
            if not may(who.operator.role, needed):
                raise AuthError(403, "forbidden", f"This needs the {needed} role; you are {who.operator.role}.")
            return await run(request, who, fields)

        return endpoint

    # -- sign in and out -----------------------------------------------------------------------

    async def login_form(request: Request) -> Response:
        import secrets

        token = secrets.token_urlsafe(24)
        response: Response = html(pages.login_page(token))
        _cookie(response, request, LOGIN_COOKIE, token, path="/console/login")
        return response

    async def login(request: Request) -> Response:
        import hmac
        import secrets

        fields = await form_of(request)
        sent, kept = fields.get("csrf", ""), request.cookies.get(LOGIN_COOKIE, "")
        if not kept or not hmac.compare_digest(sent, kept):
            raise AuthError(403, "forbidden", "The sign-in form's CSRF token is missing or wrong: reload the page.")
        client = request.client.host if request.client else "unknown"
        name = fields.get("name", "")[:64]
        try:
            session_id = await console.sessions.login(name, fields.get("password", ""), client)
        except AuthError as exc:
            if exc.status not in (401, 429):
                raise
            token = secrets.token_urlsafe(24)
            response: Response = html(pages.login_page(token, message=exc.message, name=name), exc.status)
            _cookie(response, request, LOGIN_COOKIE, token, path="/console/login")
            return response
        response = see_other("/console/approvals")  # 303: the browser GETs the page, never re-POSTs the password
        _cookie(response, request, COOKIE, session_id, path="/console")
        response.delete_cookie(LOGIN_COOKIE, path="/console/login")
        return response

    async def logout(request: Request, who: SignedIn, fields: dict[str, str]) -> Response:
        await console.sessions.logout(who)
        response = see_other("/console/login")
        response.delete_cookie(COOKIE, path="/console")
        return response

    # -- approvals -----------------------------------------------------------------------------

    async def approvals_page(request: Request, who: SignedIn) -> Response:
        cards = await _approval_cards(console, viewer_of(who))
        flash = _flash(request)
        body = (
            '<p class="hint">Held jobs appear here as agents submit them (checked every 2 s).</p>'
            f'<section id="approvals" data-poll="/console/approvals/list" aria-live="polite">{cards}</section>'
        )
        return html(pages.layout("Approvals", body, viewer=viewer_of(who), current="approvals", flash=flash))

    async def approvals_list(request: Request, who: SignedIn) -> Response:
        return html(await _approval_cards(console, viewer_of(who)))

    async def decide(request: Request, who: SignedIn, fields: dict[str, str]) -> Response:
        job_id = request.path_params["job_id"]
        verb = request.path_params["verb"]
        if verb not in ("approve", "deny"):
            raise AuthError(404, "not_found", "No such page.")
        try:
            if verb == "approve":
                job = await approvals.approve(console.store, job_id, by=who.by)
            else:
                job = await approvals.deny(console.store, job_id, by=who.by, reason=fields.get("reason") or None)
        except approvals.ApprovalError:
            return see_other(f"/console/approvals?flash=gone&job={quote(job_id)}")
        await console.changed(job)
        return see_other(f"/console/approvals?flash={verb}d&job={quote(job.id)}")

    # -- jobs ----------------------------------------------------------------------------------

    async def jobs_page(request: Request, who: SignedIn) -> Response:
        q = request.query_params
        agent, state, backend = q.get("agent") or None, q.get("state") or None, q.get("backend") or None
        chosen = JobState(state) if state in {s.value for s in JobState} else None
        jobs = await console.store.list_jobs(agent=agent, state=chosen, limit=200, before_seq=None)
        if backend:
            jobs = [j for j in jobs if j.backend == backend]
        keys = await console.store.list_keys()
        agents = sorted({k.agent for k in keys} | {j.agent for j in jobs})
        backends = sorted(set((await console.store.active_job_counts("backend")).keys()) | {j.backend for j in jobs})
        filters = (
            '<form method="get" action="/console/jobs" class="filters">'
            + pages.select("agent", "Agent", agents, agent)
            + pages.select("state", "State", [s.value for s in JobState], state)
            + pages.select("backend", "Backend", backends, backend)
            + "<button type=submit>Filter</button></form>"
        )
        rows = [
            [
                f'<a href="/console/jobs/{h(j.id)}">{h(j.id)}</a>',
                h(j.agent),
                h(j.project),
                h(j.backend),
                f'<span class="state {h(j.state.value)}">{h(j.state.value)}</span>',
                h(j.shots),
                usd(j.estimate_micro_usd),
                h(when(j.created_at)),
            ]
            for j in jobs
        ]
        header = ["Job", "Agent", "Project", "Backend", "State", "Shots", "Estimate", "Created"]
        body = filters + table(header, rows, caption=f"{len(rows)} job(s), newest first", empty="No jobs match.")
        return html(pages.layout("Jobs", body, viewer=viewer_of(who), current="jobs"))

    async def job_page(request: Request, who: SignedIn) -> Response:
        from qpu_gateway.jobs.timeline import job_timeline

        job = await console.store.get_job(request.path_params["job_id"])
        if job is None:
            raise AuthError(404, "not_found", "No such job.")
        viewer = viewer_of(who)
        timeline = await job_timeline(console.store, job, whole=True)
        facts = [
            ("Agent", job.agent),
            ("Project", job.project),
            ("Backend", job.backend),
            ("State", job.state.value),
            ("Shots", job.shots),
            ("Circuits", job.n_circuits),
            ("Estimate", usd(job.estimate_micro_usd) if job.pricing_known else "unknown"),
            ("Charged", usd(job.ledger_micro_usd) if job.ledger_status == "committed" else "-"),
            ("Approved by", job.approved_by or "-"),
            ("Error", f"{job.error_code}: {job.error_message}" if job.error_code else "-"),
            ("Created", when(job.created_at)),
            ("Finished", when(job.finished_at)),
        ]
        dl = "<dl class=facts>" + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in facts) + "</dl>"
        events = table(
            ["At", "Event", "Code", "Detail"],
            ([h(e.at), h(e.event), h(e.code or ""), h(e.detail or "")] for e in timeline.events),
        )
        charts = ""
        for i, circuit in enumerate(job.result or ()):
            for register, counts in circuit.items():
                charts += f"<h3>Circuit {i + 1}, {h(register)}</h3>" + pages.histogram(
                    f"Counts of circuit {i + 1} ({register})", counts
                )
        drawings = "".join(
            f"<h3>Circuit {i + 1}</h3><pre class=circuit>{h(d)}</pre>"
            for i, d in enumerate(await _drawings(job.circuits))
        )
        cancel = ""
        if job.state not in TERMINAL and viewer.may("admin"):
            cancel = pages.button_form(
                viewer,
                f"/console/jobs/{job.id}/cancel",
                "Cancel job",
                fields=pages.text_input("reason", "Reason (the agent reads it)", required=True),
                danger=True,
            )
        body = (
            f"{dl}{cancel}<h2>Timeline</h2>{events}<h2>Counts</h2>{charts or '<p class=empty>No counts yet.</p>'}"
            f"<h2>Circuits</h2>{drawings}"
        )
        return html(pages.layout(f"Job {job.id}", body, viewer=viewer, current="jobs", flash=_flash(request)))

    async def cancel(request: Request, who: SignedIn, fields: dict[str, str]) -> Response:
        from qpu_gateway.jobs import cancellation

        job = await console.store.get_job(request.path_params["job_id"])
        reason = fields.get("reason", "").strip()[:500]
        if job is None or job.state in TERMINAL or not reason:
            raise AuthError(409, "conflict", "The job already ended, or no reason was given.")
        done = await cancellation.cancel_job(
            console.store, job, cancellation.Canceller.operator(who.by, reason), providers=console.providers
        )
        if done is not None:
            await console.changed(done.job)
        return see_other(f"/console/jobs/{quote(job.id)}?flash=cancelled&job={quote(job.id)}")

    # -- spend ---------------------------------------------------------------------------------

    async def spend_page(request: Request, who: SignedIn) -> Response:
        from qpu_gateway.jobs.service import quota_usage

        keys = await console.store.list_keys()
        pairs = sorted({(k.agent, k.project) for k in keys})
        policy = console.policy.current
        rows: dict[tuple[str, str, str], tuple[int, int | None]] = {}
        for agent, project in pairs:
            lines, _ = await quota_usage(
                console.store, policy.rules_for(agent=agent, project=project), agent=agent, project=project
            )
            for line in lines:
                if line.dimension == "cost" and line.period in ("day", "month"):
                    who_id = agent if line.scope == "agent" else project
                    rows[(line.period, line.scope, who_id)] = (line.committed + line.reserved, line.limit)
        body = ""
        for period in ("day", "month"):
            bars = [
                (f"{scope} {name}", used / 1e6, None if cap is None else cap / 1e6)
                for (p, scope, name), (used, cap) in sorted(rows.items())
                if p == period
            ]
            body += f"<h2>This {period} (UTC)</h2>" + pages.bar_chart(
                f"Spend this {period} against caps", bars, unit="$"
            )
            body += table(
                ["Who", "Used (committed + reserved)", "Cap", "Left"],
                (
                    [
                        h(label),
                        h(f"${used:,.2f}"),
                        h("-" if cap is None else f"${cap:,.2f}"),
                        h("-" if cap is None else f"${cap - used:,.2f}"),
                    ]
                    for label, used, cap in bars
                ),
                empty="No agents with keys.",
            )
        return html(pages.layout("Spend", body, viewer=viewer_of(who), current="spend"))

    # -- agents and keys -----------------------------------------------------------------------

    async def agents_page(request: Request, who: SignedIn, *, shown_key: str = "", status: int = 200) -> Response:
        viewer = viewer_of(who)
        keys = await console.store.list_keys()
        paused = {p.name: p for p in await console.store.pauses("agent")}
        counts = await console.store.active_job_counts("agent")
        now = time.time()
        admin = viewer.may("admin")
        body = ""
        if shown_key:
            body += (
                '<section class="key-once" aria-labelledby="key-once-h"><h2 id="key-once-h">The key, shown once</h2>'
                "<p>Copy it now: it is stored only as a hash and cannot be shown again.</p>"
                f'<label for="new-key">Key</label><input id="new-key" readonly value="{h(shown_key)}"></section>'
            )
        agent_rows = []
        for agent in sorted({k.agent for k in keys} | set(paused) | set(counts)):
            pause = paused.get(agent)
            waiting, running = counts.get(agent, (0, 0))
            control = ""
            if admin and pause is None:
                control = pages.button_form(
                    viewer,
                    f"/console/agents/{agent}/pause",
                    "Pause",
                    fields=pages.text_input("reason", f"Reason to pause {agent}", uid=agent),
                    danger=True,
                )
            elif admin:
                control = pages.button_form(viewer, f"/console/agents/{agent}/resume", "Resume")
            agent_rows.append(
                [
                    h(agent),
                    h(waiting),
                    h(running),
                    h("active" if pause is None else f"paused by {pause.paused_by}: {pause.reason or '-'}"),
                    control,
                ]
            )
        body += "<h2>Agents</h2>" + table(["Agent", "Waiting", "Running", "Status", ""], agent_rows)
        key_rows = []
        for k in keys:
            status_text = (
                "revoked" if k.revoked_at else ("expired" if k.expires_at and k.expires_at <= now else "active")
            )
            control = ""
            if admin and status_text == "active":
                control = pages.button_form(viewer, f"/console/keys/{k.id}/rotate", "Rotate") + pages.button_form(
                    viewer, f"/console/keys/{k.id}/revoke", "Revoke", danger=True
                )
            key_rows.append(
                [
                    h(k.id),
                    h(k.agent),
                    h(k.project),
                    h(",".join(sorted(k.scopes))),
                    h(when(k.created_at)),
                    h(when(k.expires_at)),
                    h(when(k.last_used_at)),
                    h(status_text),
                    control,
                ]
            )
        body += "<h2>Keys</h2>" + table(
            ["Id", "Agent", "Project", "Scopes", "Created", "Expires", "Last used", "Status", ""], key_rows
        )
        if admin:
            scopes = "".join(
                f'<label class="check"><input type="checkbox" name="scope_{s}" value="1" checked> {s}</label>'
                for s in SCOPES
            )
            ttl = pages.select("ttl", "Expires after", list(TTLS), "never", any_label="never")
            body += (
                '<h2>New key</h2><form method="post" action="/console/keys" class="stack">'
                + pages.csrf_field(viewer)
                + pages.text_input("agent", "Agent", required=True)
                + pages.text_input("project", "Project", value="default", required=True)
                + f"<fieldset><legend>Scopes</legend>{scopes}</fieldset>{ttl}"
                + "<button type=submit>Create key</button></form>"
            )
        return html(
            pages.layout("Agents and keys", body, viewer=viewer, current="agents", flash=_flash(request)), status
        )

    async def key_create(request: Request, who: SignedIn, fields: dict[str, str]) -> Response:
        chosen = ",".join(s for s in SCOPES if fields.get(f"scope_{s}"))
        try:
            scopes = parse_scopes(chosen)
            _, key = await create_key(
                console.store,
                agent=fields.get("agent", "").strip(),
                project=fields.get("project", "").strip() or "default",
                scopes=scopes,
                ttl_s=TTLS.get(fields.get("ttl") or "never"),
                by=who.by,
            )
        except ValueError as exc:
            raise AuthError(400, "invalid_arguments", str(exc)) from None
        return await agents_page(request, who, shown_key=key)

    async def key_act(request: Request, who: SignedIn, fields: dict[str, str]) -> Response:
        key_id, verb = request.path_params["key_id"], request.path_params["verb"]
        if verb not in ("revoke", "rotate"):
            raise AuthError(404, "not_found", "No such page.")
        if verb == "revoke":
            if not await revoke_key(console.store, key_id, by=who.by):
                raise AuthError(409, "conflict", f"No active key {key_id}.")
            return see_other(f"/console/agents?flash=revoked&job={quote(key_id)}")
        try:
            key = await rotate_key(console.store, key_id, by=who.by)
        except ValueError as exc:
            raise AuthError(409, "conflict", str(exc)) from None
        return await agents_page(request, who, shown_key=key)

    async def pause_act(request: Request, who: SignedIn, fields: dict[str, str]) -> Response:
        name, verb = request.path_params["name"], request.path_params["verb"]
        kind = "agent" if request.url.path.startswith("/console/agents/") else "backend"
        if verb not in ("pause", "resume"):
            raise AuthError(404, "not_found", "No such page.")
        try:
            if verb == "pause":
                await pauses.pause(console.store, kind, name, by=who.by, reason=fields.get("reason") or None)
            else:
                await pauses.resume(console.store, kind, name, by=who.by)
        except (ValueError, pauses.PauseError) as exc:
            raise AuthError(409, "conflict", str(exc)) from None
        if verb == "resume" and console.wake is not None:
            console.wake()  # its held jobs may run now
        return see_other(f"/console/{kind}s?flash={verb}d&job={quote(name)}")

    # -- backends ------------------------------------------------------------------------------

    async def backends_page(request: Request, who: SignedIn) -> Response:
        viewer = viewer_of(who)
        listed = await console.providers.backends()
        paused = {p.name: p for p in await console.store.pauses("backend")}
        counts = await console.store.active_job_counts("backend")
        breakers = console.breakers() if console.breakers is not None else None
        ids = [b.id for b in listed if not b.id.endswith("/*")]
        ids += sorted((set(paused) | set(counts)) - set(ids))
        by_id = {b.id: b for b in listed}
        rows = []
        reasons: list[str] = []  # why backends are unavailable, each once (many share one: no credentials)
        for backend in ids:
            b = by_id.get(backend)
            status = "not listed" if b is None else b.status
            if b is not None and b.reason:
                if b.reason not in reasons:
                    reasons.append(b.reason)
                status += f" [{reasons.index(b.reason) + 1}]"
            pause = paused.get(backend)
            waiting, running = counts.get(backend, (0, 0))
            control = ""
            if viewer.may("admin"):
                if pause is None:
                    control = pages.button_form(
                        viewer,
                        f"/console/backends/{backend}/pause",
                        "Pause",
                        fields=pages.text_input("reason", f"Reason to pause {backend}", uid=backend.replace("/", "-")),
                        danger=True,
                    )
                else:
                    control = pages.button_form(viewer, f"/console/backends/{backend}/resume", "Resume")
            rows.append(
                [
                    h(backend),
                    h(status),
                    h("unknown here" if breakers is None else breakers.get(backend, "closed")),
                    h("-" if b is None or b.queue_depth is None else b.queue_depth),
                    h(waiting),
                    h(running),
                    h("active" if pause is None else f"paused by {pause.paused_by}: {pause.reason or '-'}"),
                    control,
                ]
            )
        header = ["Backend", "Status", "Breaker", "Provider queue", "Waiting here", "Running", "Pause", ""]
        body = table(header, rows, empty="No backends.")
        if reasons:  # an unavailable backend says why (no credentials, provider unreachable): what to fix
            notes = "".join(f"<li>{h(reason)}</li>" for reason in reasons)
            body += f'<h2>Why backends are unavailable</h2><ol class="notes">{notes}</ol>'
        return html(pages.layout("Backends", body, viewer=viewer, current="backends", flash=_flash(request)))

    # -- audit ---------------------------------------------------------------------------------

    async def audit_page(request: Request, who: SignedIn) -> Response:
        q = request.query_params
        agent, job_id, tool = q.get("agent") or None, q.get("job") or None, q.get("tool") or None
        try:
            limit = max(1, min(int(q.get("n") or 100), 1000))
        except ValueError:
            limit = 100
        rows = await console.store.audit_tail(limit=limit if tool is None else 1000, job_id=job_id, agent=agent)
        if tool:
            rows = [r for r in rows if r.tool == tool or r.tool.startswith(tool + ".")][-limit:]
        report = await verify_log(console.store)
        verdict = (
            f'<p class="ok" role="status">Chain intact: {report.rows} rows, head {report.head_seq}:'
            f"{h((report.head_hash or '')[:16])}…</p>"
            if report.broken is None
            else f'<p class="error" role="alert">Chain broken at seq {report.broken.seq}: '
            f"{h(report.broken.message)}</p>"
        )
        filters = (
            '<form method="get" action="/console/audit" class="filters">'
            + pages.text_input("agent", "Agent", value=agent or "")
            + pages.text_input("job", "Job", value=job_id or "")
            + pages.text_input("tool", "Tool or act", value=tool or "")
            + "<button type=submit>Filter</button></form>"
            + '<p><a href="/console/audit/export.jsonl" download>Export every row as JSON lines</a></p>'
        )
        listed = table(
            ["Seq", "At", "Agent", "Operator", "Tool", "Decision", "Code", "Job", "Detail"],
            (
                [
                    h(r.seq),
                    h(when(r.at)),
                    h(r.agent or ""),
                    h(r.operator or ""),
                    h(r.tool),
                    h(r.decision),
                    h(r.error_code or ""),
                    h(r.job_id or ""),
                    h(r.detail or ""),
                ]
                for r in reversed(rows)
            ),
            caption=f"The latest {len(rows)} row(s), newest first",
        )
        return html(pages.layout("Audit log", verdict + filters + listed, viewer=viewer_of(who), current="audit"))

    async def audit_export(request: Request, who: SignedIn) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            async with aclosing(console.store.audit_pages()) as pages_:
                async for page_ in pages_:
                    yield "".join(json.dumps(exported(r), separators=(",", ":")) + "\n" for r in page_).encode()

        headers = {**HEADERS, "content-disposition": 'attachment; filename="audit.jsonl"'}
        return StreamingResponse(lines(), media_type="application/x-ndjson", headers=headers)

    # -- policy --------------------------------------------------------------------------------

    async def policy_page(request: Request, who: SignedIn) -> Response:
        from qpu_gateway.jobs.processes import LIVE_FOR_S
        from qpu_gateway.policy.file import overrides_path

        source = console.policy
        facts = [
            ("Policy file", str(source.path)),
            ("sha256 in force", source.sha256 or "(no file: the shipped default)"),
            ("Overrides file", str(overrides_path(source.path))),
            ("Overrides sha256 in force", source.overrides_sha256 or "(no file)"),
            ("Last reload error", source.last_error or "none"),
        ]
        dl = "<dl class=facts>" + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in facts) + "</dl>"
        if source.last_error:
            refused = "The file on disk was refused; the last good policy stays in force."
            dl = f'<p class="error" role="alert">{refused}</p>{dl}'
        defaults = json.dumps(source.current.defaults.model_dump(mode="json"), indent=1)
        prices = table(
            ["Backends", "Price model"],
            ([h(p.pattern), h(p.describe())] for p in source.current.prices.values()),
        )
        processes = await console.store.processes(time.time() - LIVE_FOR_S)
        procs = table(
            ["Process", "Serving", "Policy sha256", "Overrides sha256", "Note"],
            (
                [
                    h(f"{p.host}:{p.pid}"),
                    h(p.serving),
                    h((p.policy_sha256 or "-")[:16]),
                    h((p.overrides_sha256 or "-")[:16]),
                    h("file refused: " + p.policy_error if p.policy_error else ""),
                ]
                for p in processes
            ),
            empty="No gateway process reported in the last 15 s.",
        )
        body = (
            f'{dl}<h2>Defaults in force</h2><pre class="json">{h(defaults)}</pre><h2>Prices</h2>{prices}'
            f"<h2>Gateway processes on this database</h2>{procs}"
        )
        return html(pages.layout("Policy", body, viewer=viewer_of(who), current="policy"))

    # -- static files --------------------------------------------------------------------------

    assets = {
        name: (resources.files("qpu_gateway.ops.console").joinpath("static", name).read_bytes(), kind)
        for name, kind in (("console.css", "text/css"), ("console.js", "text/javascript"))
    }

    async def static(request: Request) -> Response:
        found = assets.get(request.path_params["name"])
        if found is None:
            return Response("not found", 404, headers=HEADERS)
        return Response(found[0], media_type=found[1], headers={**HEADERS, "cache-control": "max-age=300"})

    async def home(request: Request) -> Response:
        return see_other("/console/approvals")

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AuthError)
        who = await console.sessions.signed_in(request.cookies.get(COOKIE))
        viewer = viewer_of(who) if who else None
        return html(pages.error_page(viewer, exc.status, exc.message), exc.status)

    async def store_down(request: Request, exc: Exception) -> Response:
        log.warning("console request failed on the database: %s", exc)
        return html(pages.error_page(None, 503, f"The gateway's database did not answer: {exc}"), 503)

    routes = [
        Route("/", home),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", act("viewer", logout), methods=["POST"]),
        Route("/approvals", page(approvals_page)),
        Route("/approvals/list", page(approvals_list)),
        Route("/approvals/{job_id}/{verb:str}", act("approver", decide), methods=["POST"]),
        Route("/jobs", page(jobs_page)),
        Route("/jobs/{job_id}", page(job_page)),
        Route("/jobs/{job_id}/cancel", act("admin", cancel), methods=["POST"]),
        Route("/spend", page(spend_page)),
        Route("/agents", page(lambda r, w: agents_page(r, w))),
        Route("/keys", act("admin", key_create), methods=["POST"]),
        Route("/keys/{key_id}/{verb:str}", act("admin", key_act), methods=["POST"]),
        Route("/agents/{name:str}/{verb:str}", act("admin", pause_act), methods=["POST"]),
        Route("/backends/{name:path}/{verb:str}", act("admin", pause_act), methods=["POST"]),
        Route("/backends", page(backends_page)),
        Route("/audit", page(audit_page)),
        Route("/audit/export.jsonl", page(audit_export)),
        Route("/policy", page(policy_page)),
        Route("/static/{name:str}", static),
    ]
    return Starlette(
        routes=[Mount("/console", routes=routes)],
        exception_handlers={AuthError: refused, StoreError: store_down},
    )


def _cookie(response: Response, request: Request, name: str, value: str, *, path: str) -> None:
    # Secure only over https: on plain loopback http a Secure cookie would never be sent back.
    response.set_cookie(name, value, path=path, httponly=True, samesite="strict", secure=request.url.scheme == "https")


_FLASHES = {
    "approved": "Job {} approved: it is queued.",
    "denied": "Job {} denied.",
    "gone": "Job {} is no longer waiting for approval.",
    "cancelled": "Job {} cancelled.",
    "revoked": "Key {} revoked.",
    "paused": "{} paused.",
    "resumed": "{} resumed.",
}


def _flash(request: Request) -> str:
    """The message of a finished act, from a fixed set (a link cannot make the page say anything else)."""
    text = _FLASHES.get(request.query_params.get("flash", ""))
    return text.format(request.query_params.get("job", "")[:140]) if text else ""


async def _drawings(circuits: tuple[str, ...]) -> list[str]:
    """Qiskit's text drawing of each OpenQASM source (in a thread: Qiskit's parser is slow and blocking)."""

    def draw() -> list[str]:
        from qpu_gateway.adapters.qasm import load

        out = []
        for source in circuits:
            try:
                out.append(str(load(source).draw("text", fold=100)))
            except Exception as exc:  # a stored circuit was checked at admission; say why if it fails now
                out.append(f"(cannot draw: {type(exc).__name__})")
        return out

    return await anyio.to_thread.run_sync(draw)


async def _approval_cards(console: Console, viewer: Viewer) -> str:
    from qpu_gateway.jobs.service import quota_usage
    from qpu_gateway.policy.pricing import price_for

    held = await console.store.pending_approvals()
    if not held:
        return '<p class="empty">No job is waiting for approval.</p>'
    policy = console.policy.current
    cards = []
    for job in held:
        price = price_for(policy.prices, job.backend)
        lines, _ = await quota_usage(
            console.store, policy.rules_for(agent=job.agent, project=job.project), agent=job.agent, project=job.project
        )
        budget = [
            f"{line.scope} {line.period}: {usd(line.remaining)} left of {usd(line.limit)}"
            for line in lines
            if line.dimension == "cost" and line.limit is not None
        ]
        drawings = "".join(f"<pre class=circuit>{h(d)}</pre>" for d in await _drawings(job.circuits))
        facts = [
            ("Agent", job.agent),
            ("Project", job.project),
            ("Backend", job.backend),
            ("Shots", f"{job.shots} x {job.n_circuits} circuit(s)"),
            ("Estimate", usd(job.estimate_micro_usd) if job.pricing_known else "unknown (no price)"),
            ("Price model", price.describe() if price else "none"),
            ("Budget left", "; ".join(budget) or "no cost cap"),
            ("Expires", when(job.approval_expires_at)),
        ]
        dl = "<dl class=facts>" + "".join(f"<dt>{h(k)}</dt><dd>{h(v)}</dd>" for k, v in facts) + "</dl>"
        controls = ""
        if viewer.may("approver"):
            controls = (
                '<div class="decide">'
                + pages.button_form(viewer, f"/console/approvals/{job.id}/approve", "Approve")
                + pages.button_form(
                    viewer,
                    f"/console/approvals/{job.id}/deny",
                    "Deny",
                    fields=pages.text_input("reason", "Reason", uid=job.id),
                    danger=True,
                )
                + "</div>"
            )
        cards.append(
            f'<article class="approval" data-job="{h(job.id)}" aria-labelledby="h-{h(job.id)}">'
            f'<h2 id="h-{h(job.id)}"><a href="/console/jobs/{h(job.id)}">{h(job.id)}</a>'
            f"{' · ' + h(job.name) if job.name else ''}</h2>{dl}{drawings}{controls}</article>"
        )
    return "".join(cards)


class ConsoleFront:
    """ASGI: requests under /console go to the console, everything else to the gateway's own app."""

    def __init__(self, app: ASGIApp, console: ASGIApp) -> None:
        self.app = app
        self.console = console

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and (path == "/console" or path.startswith("/console/")):
            await self.console(scope, receive, send)
            return
        await self.app(scope, receive, send)
