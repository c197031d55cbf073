"""Who the operator is: the OS user running the CLI (or a serving process), named on the audit rows
of every operator act (keys, quotas, approvals, pauses, cancels, policy reloads)."""

from __future__ import annotations

import os
import pwd

from qpu_gateway.store.records import AuditEntry


def operator_name() -> str:
    """The name of this process's effective user, plus the user who ran `sudo` where that applies.

    Read from the uid, not from $USER or $LOGNAME, which any caller can set to anything.
    """
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid with no passwd entry (some containers): still record who acted
        name = f"uid {uid}"
    invoker = os.environ.get("SUDO_USER")
    if uid == 0 and invoker and invoker != name:
        return f"{name} (sudo from {invoker})"
    return name


def operator_entry(
    tool: str,
    by: str,
    *,
    detail: str | None = None,
    decision: str = "ok",
    error_code: str | None = None,
    agent: str | None = None,
    project: str | None = None,
    key_id: str | None = None,
    job_id: str | None = None,
) -> AuditEntry:
    """The audit row of one operator act, e.g. `keys.revoke` or `agents.pause`."""
    return AuditEntry(
        tool=tool,
        decision=decision,
        agent=agent,
        project=project,
        key_id=key_id,
        error_code=error_code,
        job_id=job_id,
        detail=None if detail is None else detail[:500],
        operator=by,
    )
