"""The console's HTML, rendered on the server: one function per page or part, every value escaped.

Charts are inline SVG (no script, no CDN); forms carry the session's CSRF token and labelled controls.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape

from qpu_gateway.policy.pricing import format_usd

NAV = (
    ("approvals", "Approvals"),
    ("jobs", "Jobs"),
    ("spend", "Spend"),
    ("agents", "Agents"),
    ("backends", "Backends"),
    ("audit", "Audit"),
    ("policy", "Policy"),
)


def h(value: object) -> str:
    """Escaped text for HTML (attributes included)."""
    return escape("" if value is None else str(value), quote=True)


def when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + "Z"


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who a page is rendered for: name, role, and the CSRF token its forms carry."""

    name: str
    role: str
    csrf: str

    def may(self, needed: str) -> bool:
        from qpu_gateway.ops.console.auth import may

        return may(self.role, needed)


def layout(title: str, body: str, *, viewer: Viewer | None, current: str = "", flash: str = "") -> str:
    nav = ""
    if viewer is not None:
        links = "".join(
            f'<li><a href="/console/{slug}"{" aria-current=page" if slug == current else ""}>{label}</a></li>'
            for slug, label in NAV
        )
        nav = (
            f'<nav aria-label="Console"><ul>{links}</ul>'
            f'<form method="post" action="/console/logout" class="who">{csrf_field(viewer)}'
            f"<span>{h(viewer.name)} ({h(viewer.role)})</span> <button type=submit>Sign out</button></form></nav>"
        )
    notice = f'<p class="flash" role="status">{h(flash)}</p>' if flash else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{h(title)} · qpu-gateway console</title>"
        '<link rel="stylesheet" href="/console/static/console.css">'
        '<script src="/console/static/console.js" defer></script></head><body>'
        f'<header><a class="brand" href="/console/approvals">qpu-gateway</a>{nav}</header>'
        f"<main><h1>{h(title)}</h1>{notice}{body}</main></body></html>"
    )


def csrf_field(viewer: Viewer) -> str:
    return f'<input type="hidden" name="csrf" value="{h(viewer.csrf)}">'


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, caption: str = "", empty: str = "None.") -> str:
    """A table of cells already rendered as HTML."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{h(empty)}</p>'
    head = "".join(f'<th scope="col">{h(c)}</th>' for c in header)
    cap = f"<caption>{h(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def button_form(viewer: Viewer, action: str, label: str, *, fields: str = "", danger: bool = False) -> str:
    cls = ' class="danger"' if danger else ""
    return (
        f'<form method="post" action="{h(action)}" class="inline">{csrf_field(viewer)}{fields}'
        f"<button type=submit{cls}>{h(label)}</button></form>"
    )


def text_input(name: str, label: str, *, required: bool = False, value: str = "", uid: str = "") -> str:
    """A labelled input; in a table row (`uid`), the label is for screen readers and its first word shows."""
    ident = f"{name}-{uid}" if uid else name
    req = " required" if required else ""
    return (
        f'<label for="{h(ident)}">{h(label)}</label>'
        f'<input id="{h(ident)}" name="{h(name)}" value="{h(value)}" maxlength=500{req}'
        f"{f' placeholder={chr(34)}{h(label.split(maxsplit=1)[0])}{chr(34)}' if uid else ''}>"
    )


def select(name: str, label: str, options: Sequence[str], chosen: str | None, *, any_label: str = "any") -> str:
    opts = f'<option value="">{h(any_label)}</option>' + "".join(
        f'<option value="{h(o)}"{" selected" if o == chosen else ""}>{h(o)}</option>' for o in options
    )
    return f'<label for="{h(name)}">{h(label)}</label><select id="{h(name)}" name="{h(name)}">{opts}</select>'


def login_page(token: str, *, message: str = "", name: str = "") -> str:
    error = f'<p class="error" role="alert">{h(message)}</p>' if message else ""
    body = (
        f'{error}<form method="post" action="/console/login" class="login">'
        f'<input type="hidden" name="csrf" value="{h(token)}">'
        f'<label for="name">Operator name</label><input id="name" name="name" value="{h(name)}" '
        f'autocomplete="username" required{"" if name else " autofocus"}>'
        '<label for="password">Password</label><input id="password" name="password" type="password" '
        f'autocomplete="current-password" required{" autofocus" if name else ""}>'
        "<button type=submit>Sign in</button></form>"
        '<p class="hint">Operators are made with <code>qpu-gateway operators create NAME --role ROLE</code>.</p>'
    )
    return layout("Sign in", body, viewer=None)


def error_page(viewer: Viewer | None, status: int, message: str) -> str:
    return layout(f"{status}", f'<p class="error" role="alert">{h(message)}</p>', viewer=viewer)


# -- charts ------------------------------------------------------------------------------------


def bar_chart(title: str, bars: Sequence[tuple[str, float, float | None]], *, unit: str = "") -> str:
    """Horizontal bars of used against a cap: (label, used, cap or None). Inline SVG with a text title."""
    if not bars:
        return ""
    width, label_w, row_h = 640, 200, 26
    top = max([used for _, used, _ in bars] + [cap for _, _, cap in bars if cap is not None] + [1e-9])
    height = row_h * len(bars) + 10
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="t-{h(id(bars))}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}"><title id="t-{h(id(bars))}">{h(title)}</title>'
    ]
    scale = (width - label_w - 110) / top
    for i, (label, used, cap) in enumerate(bars):
        y = 5 + i * row_h
        over = cap is not None and used > cap
        parts.append(f'<text x="0" y="{y + 16}" class="label">{h(label)}</text>')
        parts.append(
            f'<rect x="{label_w}" y="{y + 3}" width="{max(used * scale, 1):.1f}" height="16" '
            f'class="{"bar over" if over else "bar"}"></rect>'
        )
        if cap is not None:
            x = label_w + cap * scale
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + 22}" class="cap"></line>')
        shown = f"{unit}{used:,.2f}" + ("" if cap is None else f" / {unit}{cap:,.2f}")
        parts.append(f'<text x="{label_w + max(used, cap or 0) * scale + 6:.1f}" y="{y + 16}">{h(shown)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram(title: str, counts: dict[str, int]) -> str:
    """Vertical bars of a circuit's measurement counts, bitstrings in order. Inline SVG."""
    if not counts:
        return ""
    items = sorted(counts.items())[:64]  # past 64 outcomes the bars are too thin to read; the table has them all
    width, height, base = 640, 220, 180
    gap = width / len(items)
    top = max(n for _, n in items)
    ident = f"hist-{abs(hash(title)) % 10**8}"
    parts = [
        f'<svg class="chart" role="img" aria-labelledby="{ident}" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}"><title id="{ident}">{h(title)}</title>'
    ]
    for i, (bits, n) in enumerate(items):
        bar_h = (base - 20) * n / top
        x = i * gap + gap * 0.1
        parts.append(
            f'<rect x="{x:.1f}" y="{base - bar_h:.1f}" width="{gap * 0.8:.1f}" height="{bar_h:.1f}" class="bar"></rect>'
        )
        parts.append(f'<text x="{x + gap * 0.4:.1f}" y="{base - bar_h - 4:.1f}" class="count">{n}</text>')
        parts.append(f'<text x="{x + gap * 0.4:.1f}" y="{base + 16}" class="bits">{h(bits)}</text>')
    parts.append(f'<line x1="0" x2="{width}" y1="{base}" y2="{base}" class="axis"></line></svg>')
    return "".join(parts)


def usd(micro: int | None) -> str:
    return "-" if micro is None else format_usd(micro)
