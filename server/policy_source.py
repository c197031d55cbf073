"""The policy in force: loaded from the file at start and reloaded whenever the file changes.

Every process watches the file on its own (a stat per second), so an edit applies to every
running gateway within about a second, without a restart. An invalid edit is refused with its
line and reason, logged, and the last good policy stays in force.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio

from qpu_gateway.policy.file import Policy, PolicyFileError, load_policy, overrides_path

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


class PolicySource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        self.current: Policy = load_policy(path)  # at start an invalid file is an error, not a fallback
        self.last_error: str | None = None

    def _stat(self) -> tuple[tuple[int, int] | None, ...]:
        """The policy file's and the overrides file's (mtime, size); None for a missing file."""
        stamps: list[tuple[int, int] | None] = []
        for path in (self.path, overrides_path(self.path)):
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def reload_if_changed(self) -> bool:
        """Reload when the file's mtime or size changed; True if a new policy took effect."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = load_policy(self.path)
        except PolicyFileError as exc:
            self.last_error = str(exc)
            log.error("policy file refused, the last good policy stays in force: %s", exc)
            return False
        self.current, self.last_error = policy, None
        log.info("policy reloaded", extra={"path": str(self.path)})
        return True

    async def watch(self, interval_s: float = CHECK_INTERVAL_S) -> None:
        while True:
            await anyio.sleep(interval_s)
            self.reload_if_changed()
