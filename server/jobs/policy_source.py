"""The policy in force: loaded from the file at start and reloaded whenever the file changes.

Every process watches the file on its own (a stat per second), so an edit applies to every
running gateway within about a second, without a restart. An invalid edit is refused with its
line and reason, logged, and the last good policy stays in force. Each reload, applied or
refused, is reported with the sha256 of both files as read, so the gateway can audit it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from qpu_gateway.policy.file import Policy, PolicyFileError, load_policy, overrides_path

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Reload:
    """One reload: applied or refused, and what the policy file and the overrides file held."""

    applied: bool
    policy_path: Path
    policy_sha256: str | None  # None: the file does not exist (the shipped default applies)
    overrides_path: Path
    overrides_sha256: str | None  # None: no overrides file
    error: str | None = None  # why it was refused

    def describe(self) -> str:
        """One line for the audit log: the outcome and both files' hashes first, then the reason."""
        files = (
            f"policy {self.policy_path} sha256 {self.policy_sha256 or '(no file: the shipped default)'}; "
            f"overrides {self.overrides_path.name} beside it sha256 {self.overrides_sha256 or '(no file)'}"
        )
        if self.applied:
            return f"applied {files}"
        # The error names its file by path, which the line already gave: said again (or the overrides
        # file's whole path, always the policy file's folder), a long path would push the reason past
        # the audit row's 500 characters.
        reason = str(self.error)
        for name, path in (("policy", self.policy_path), ("overrides", self.overrides_path)):
            if reason.startswith(f"{path}: "):
                reason = f"{name} file: {reason.removeprefix(f'{path}: ')}"
        return f"refused, the last good policy stays in force: {files}; {reason}"


class PolicySource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = self._stat()
        # The content hashes of the files in force (taken just before parsing, as on a reload): what
        # every process sharing a database must agree on, and what each reports there.
        self.sha256, self.overrides_sha256 = _sha256(path), _sha256(overrides_path(path))
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

    def reload_if_changed(self) -> Reload | None:
        """Reload when either file's mtime or size changed; None when neither did."""
        stamp = self._stat()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        hashes = self._hashes()
        policy: Policy | None = None
        error: PolicyFileError | None = None
        try:
            policy = load_policy(self.path)
        except PolicyFileError as exc:
            error = exc
        if self._hashes() != hashes:
            # A write landed while this read (an editor writing in place, in several pieces): what
            # was parsed may not be what was hashed. Nothing is applied or reported; the next check
            # reads the file again, once it holds still.
            self._stamp = ()
            return None
        if policy is None:
            self.last_error = str(error)
            log.error("policy file refused, the last good policy stays in force: %s", error)
            return Reload(False, *hashes, error=str(error))
        self.current, self.last_error = policy, None
        self.sha256, self.overrides_sha256 = hashes[1], hashes[3]
        log.info("policy reloaded", extra={"path": str(self.path), "sha256": hashes[1], "overrides_sha256": hashes[3]})
        return Reload(True, *hashes)

    def _hashes(self) -> tuple[Path, str | None, Path, str | None]:
        extra = overrides_path(self.path)
        return self.path, _sha256(self.path), extra, _sha256(extra)

    async def watch(
        self, interval_s: float = CHECK_INTERVAL_S, on_reload: Callable[[Reload], Awaitable[None]] | None = None
    ) -> None:
        while True:
            await anyio.sleep(interval_s)
            reload = self.reload_if_changed()
            if reload is not None and on_reload is not None:
                await on_reload(reload)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable: load_policy reports it; the row says why there is no hash
        return f"(unreadable: {exc.strerror})"
