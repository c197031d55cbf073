"""`make chaos`: every scenario at full size against real server processes; prints one table.

    python -m tests.chaos [--only crash,storm,...] [--small] [--keep DIR] [--json FILE]

Exit status 1 if any scenario broke an invariant (its row says which).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import anyio

from .harness import Row, render
from .scenarios import FULL, SCENARIOS, SMALL, clean, fuzz, json_rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--only", help="comma-separated scenarios: " + ", ".join([*SCENARIOS, "fuzz"]))
    parser.add_argument("--small", action="store_true", help="the sizes make test uses")
    parser.add_argument("--keep", type=Path, help="keep every scenario's files in this folder")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    size = SMALL if args.small else FULL
    chosen = args.only.split(",") if args.only else [*SCENARIOS, "fuzz"]
    unknown = set(chosen) - {*SCENARIOS, "fuzz"}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    root = args.keep or Path(tempfile.mkdtemp(prefix="qpu-chaos-"))
    rows: list[Row] = []
    for name in chosen:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        try:
            if name == "fuzz":
                row = fuzz(root / name, size) if size.fuzz_calls else Row("hostile input: skipped (--small)")
            else:
                row = anyio.run(SCENARIOS[name], root, size)
        except Exception as exc:  # a scenario that crashed is a broken row, and the others still run
            traceback.print_exc()
            row = Row(name, broken=[f"the scenario crashed: {type(exc).__name__}: {str(exc)[:300]}"])
        row.seconds = time.monotonic() - began
        rows.append(row)
        print(render([row]), file=sys.stderr, flush=True)
    print(render(rows))
    if args.json:
        args.json.write_text(json_rows(rows), encoding="utf-8")
    if not args.keep:
        clean(root)
    return 1 if any(row.broken for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
