"""The table on stdout and the JSON file in bench/results/."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.model import Row

RESULTS = Path(__file__).resolve().parent / "results"


def _number(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def _figure(value: float, unit: str) -> str:
    return f"{_number(value, unit)} {unit}"


def _tail(row: Row, side: str) -> str:
    summary = getattr(row, side)
    if summary.p90 is None or summary.p99 is None:
        return ""
    return f" (p90 {_number(summary.p90, row.unit)}, p99 {_number(summary.p99, row.unit)})"


def table(rows: list[Row]) -> str:
    header = ["measure", "baseline", "ours", "ratio", "target", "met?"]
    lines = [
        [
            row.measure,
            _figure(row.baseline.median, row.unit) + _tail(row, "baseline"),
            _figure(row.ours.median, row.unit) + _tail(row, "ours"),
            f"{row.ratio:.2f}×",
            str(row.target),
            "yes" if row.met else "NO",
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) for c, w in zip(header, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def details(rows: list[Row]) -> str:
    """Each row's breakdown, if it has one, under its measure's name."""
    blocks = [f"{row.measure}:\n" + "\n".join(f"  {line}" for line in row.details) for row in rows if row.details]
    return "\n\n".join(blocks)


def markdown(rows: list[Row]) -> str:
    """The same table in Markdown, for the README's Performance section."""
    out = ["| measure | baseline | ours | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for row in rows:
        out.append(
            f"| {row.measure} | {_figure(row.baseline.median, row.unit)} | {_figure(row.ours.median, row.unit)} | "
            f"{row.ratio:.2f}× | {row.target} | {'yes' if row.met else '**no**'} |"
        )
    return "\n".join(out)


def write(
    rows: list[Row], machine: dict[str, Any], settings: dict[str, Any], errors: dict[str, str], *, suffix: str = ""
) -> Path:
    """Write bench/results/<YYYY-MM-DD>-<host><suffix>.json (a later run on the same day replaces it).

    A quick or partial run gets a suffix, so it never replaces the day's full run.
    """
    RESULTS.mkdir(exist_ok=True)
    now = datetime.now(UTC)
    path = RESULTS / f"{now.strftime('%Y-%m-%d')}-{machine['host']}{suffix}.json"
    document = {
        "finished_at": now.isoformat(timespec="seconds"),
        "machine": machine,
        "settings": settings,
        "rows": [row.as_dict() for row in rows],
        "errors": errors,
    }
    path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
