"""Summarise cProfile files from a profiled run: where our server spent its main thread's time.

    python -m bench --only submit_job --profile /tmp/prof     # writes /tmp/prof/ours-*.prof
    python -m bench.hotspots /tmp/prof/ours-*.prof [--top 25] [--filter qpu_gateway]

cProfile sees the main thread only, which is the event loop: every handler, the middleware,
admission and the worker's bookkeeping run there. Work sent to threads (aiosqlite statements,
Qiskit parsing and Aer runs) shows as the time the loop waited for it (`select`/`epoll`), not
as the thread's own frames.
"""

from __future__ import annotations

import argparse
import io
import pstats
from pathlib import Path


def summary(paths: list[Path], *, top: int, sort: str, restrict: str | None) -> str:
    out = io.StringIO()
    stats = pstats.Stats(*(str(p) for p in paths), stream=out)
    stats.sort_stats(sort)
    stats.print_stats(*([restrict] if restrict else []), top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="cumulative", choices=["cumulative", "tottime", "ncalls"])
    parser.add_argument("--filter", default=None, help="only functions whose file:line matches this regex")
    args = parser.parse_args()
    print(summary(args.profiles, top=args.top, sort=args.sort, restrict=args.filter))


if __name__ == "__main__":
    main()
