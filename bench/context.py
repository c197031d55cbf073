"""What every measure is handed: the run's size (full or quick), a scratch directory, and a logger."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Context:
    quick: bool
    workdir: Path
    passage_jobs: int | None = None  # --passage-jobs: overrides the RSS-after-jobs measure's count
    started: float = field(default_factory=time.monotonic)

    def pick(self, full: int, quick: int) -> int:
        """A count for this run: `quick` for a smoke run, else `full`."""
        return quick if self.quick else full

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log(self, message: str) -> None:
        """Progress on stderr, so the table on stdout stays clean."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)
