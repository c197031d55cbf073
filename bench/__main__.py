"""Run the benchmark suite: `python -m bench [--quick] [--only NAME,...] [--list]`.

Each measure module names the measures it provides (`NAMES`) and runs the selected ones with
`run(ctx, names)`. The suite prints one table (measure, baseline, ours, ratio, target, met?)
and the machine it ran on, and writes the figures to bench/results/. A measure that fails is
reported and the rest still run: one broken measure should not cost the other figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import ModuleType

import anyio

from bench import (
    calls,
    env,
    machine,
    passage,
    replicas,
    report,
    scale,
    startup,
    statements,
    store_drivers,
    sweep,
    throughput,
)
from bench.context import Context
from bench.model import Row
from bench.phases import PHASES_ENV

# In table order; each module runs the measures of its NAMES that were selected.
MODULES: tuple[ModuleType, ...] = (
    startup,
    calls,
    throughput,
    sweep,
    scale,
    passage,
    statements,
    store_drivers,
    replicas,
)
ALL = [name for module in MODULES for name in module.NAMES]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="qpu-gateway benchmark suite (issue 6).")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run of every measure (~1-2 min)")
    parser.add_argument("--only", default="", help=f"comma-separated measures to run, of: {', '.join(ALL)}")
    parser.add_argument("--list", action="store_true", help="list the measures and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (databases, policies)")
    parser.add_argument("--workdir", type=Path, default=None, help="where scratch files go (default: a temp dir)")
    parser.add_argument("--no-write", action="store_true", help="print the table but write no results file")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="run our servers under cProfile, writing DIR/ours-<n>.prof (figures are then not comparable)",
    )
    parser.add_argument(
        "--phases",
        type=Path,
        default=None,
        metavar="DIR",
        help="trace wall time per phase inside our servers (bench/phases.py), writing DIR/phases-<pid>.json",
    )
    parser.add_argument(
        "--passage-jobs",
        type=int,
        default=None,
        help="jobs the RSS-after-jobs measure runs through the gateway (default: as many as fit its time budget)",
    )
    return parser.parse_args(argv)


async def run_all(ctx: Context, selected: list[str]) -> tuple[list[Row], dict[str, str]]:
    rows: list[Row] = []
    errors: dict[str, str] = {}
    for module in MODULES:
        names = {n for n in module.NAMES if n in selected}
        if not names:
            continue
        began = time.monotonic()
        try:
            rows += await module.run(ctx, names)
        except Exception as exc:  # reported, and the other measures still run
            traceback.print_exc()
            for name in names:
                errors[name] = f"{type(exc).__name__}: {exc}"
        ctx.log(f"{module.__name__} done in {time.monotonic() - began:.0f} s")
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for module in MODULES:
            print(f"{module.__name__}: {', '.join(module.NAMES)}")
        return 0
    selected = [n.strip() for n in args.only.split(",") if n.strip()] or ALL
    unknown = set(selected) - set(ALL)
    if unknown:
        print(f"unknown measure(s): {', '.join(sorted(unknown))}; --list shows them", file=sys.stderr)
        return 2
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        os.environ[env.PROFILE_ENV] = str(args.profile.resolve())
    if args.phases is not None:
        args.phases.mkdir(parents=True, exist_ok=True)
        os.environ[PHASES_ENV] = str(args.phases.resolve())
    info = machine.describe()
    print(machine.one_line(info), flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="qpu-bench-", dir=args.workdir))
    try:
        ctx = Context(quick=args.quick, workdir=scratch, passage_jobs=args.passage_jobs)
        began = time.monotonic()
        rows, errors = anyio.run(run_all, ctx, selected)
        elapsed = time.monotonic() - began
    finally:
        if args.keep:
            print(f"scratch kept in {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(report.table(rows))
    if breakdowns := report.details(rows):
        print()
        print(breakdowns)
    for name, error in errors.items():
        print(f"FAILED {name}: {error}")
    if args.markdown:
        print()
        print(report.markdown(rows))
    print(f"\n{sum(r.met for r in rows)}/{len(rows)} targets met; suite took {elapsed:.0f} s")
    if not args.no_write:
        suffix = ("-quick" if args.quick else "") + ("-partial" if set(selected) != set(ALL) else "")
        suffix += "-profiled" if args.profile is not None or args.phases is not None else ""
        settings = {"quick": args.quick, "measures": selected, "seconds": round(elapsed, 1)}
        settings["passage_jobs"] = args.passage_jobs
        path = report.write(rows, info, settings, errors, suffix=suffix)
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    if args.phases is not None:
        print(f"phase traces in {args.phases}; summarise with: python -m bench.phases {args.phases}/phases-*.json")
    if args.profile is not None:
        print(f"profiles in {args.profile}; summarise with: python -m bench.hotspots {args.profile}/ours-*.prof")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
