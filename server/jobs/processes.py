"""The gateway processes sharing one database, and whether they all run the same policy.

Each process (an HTTP replica behind a load balancer, a stdio server of one Claude Code session)
reads its own policy file, because that is how operators ship configuration: the same file to
every machine. What must not happen unseen is one replica running another policy (a stale copy,
a failed deploy, a refused edit): an agent's call would then be judged by whichever replica the
load balancer picked. So every process writes a report to the database every few seconds, with
the sha256 of the policy file and the overrides file in force, and compares the live reports:
a mismatch is a warning in every process's log, the `agree: false` of qpu://policy, and a
non-zero exit of `qpu-gateway processes`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterable

import anyio

from qpu_gateway.jobs.models import PolicyConsistency
from qpu_gateway.jobs.policy_source import PolicySource
from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import ProcessReport

log = logging.getLogger(__name__)

# A report every 5 s; a process silent for three reports has stopped (or is stuck). A killed
# replica thus leaves the picture within 15 s, and a report costs each process one small write
# every 5 s.
REPORT_EVERY_S = 5.0
LIVE_FOR_S = 3 * REPORT_EVERY_S


def short(sha: str | None) -> str:
    return sha[:12] if sha else "none"


def stamp_text(stamp: tuple[str | None, str | None]) -> str:
    return f"policy {short(stamp[0])} + overrides {short(stamp[1])}"


def disagreement(reports: Iterable[ProcessReport]) -> str | None:
    """None when every report carries the same policy hashes; else which processes run which."""
    groups: dict[tuple[str | None, str | None], list[ProcessReport]] = defaultdict(list)
    for report in reports:
        groups[report.policy_stamp].append(report)
    if len(groups) <= 1:
        return None
    parts = [
        f"{stamp_text(stamp)} on {', '.join(f'{r.host} pid {r.pid} ({r.serving})' for r in members)}"
        for stamp, members in sorted(groups.items(), key=lambda item: -len(item[1]))
    ]
    return f"{len(groups)} different policies: " + "; ".join(parts)


class ProcessReporter:
    """Writes this process's report every few seconds and warns while the live processes disagree."""

    def __init__(self, store: Store, policy: PolicySource, process_id: str, serving: str) -> None:
        self.store = store
        self.policy = policy
        self.id = process_id
        self.serving = serving
        self.started_at = time.time()
        self._warned: str | None = None  # the disagreement last logged, so it is logged once per change

    def report(self) -> ProcessReport:
        now = time.time()
        return ProcessReport(
            id=self.id,
            host=socket.gethostname(),
            pid=os.getpid(),
            serving=self.serving,
            started_at=self.started_at,
            seen_at=now,
            policy_path=str(self.policy.path),
            policy_sha256=self.policy.sha256,
            overrides_sha256=self.policy.overrides_sha256,
            policy_error=self.policy.last_error,
        )

    async def report_now(self) -> None:
        """Write this process's report and compare it with the others' (a database that refuses is logged)."""
        try:
            await self.store.report_process(self.report())
            live = await self.store.processes(time.time() - LIVE_FOR_S)
        except StoreError as exc:
            log.warning("cannot report this process to the database: %s", exc)
            return
        self._compare(live)

    def _compare(self, live: list[ProcessReport]) -> None:
        differs = disagreement(live)
        if differs == self._warned:
            return
        if differs is not None:
            log.warning(
                "the gateway processes on this database do not run the same policy: %s. Ship the same policy "
                "file (and overrides file) to every replica; `qpu-gateway processes` lists them",
                differs,
                extra={"policy_sha256": self.policy.sha256, "overrides_sha256": self.policy.overrides_sha256},
            )
        else:
            log.info("the gateway processes on this database agree on the policy again")
        self._warned = differs

    async def run(self) -> None:
        while True:
            await self.report_now()
            await anyio.sleep(REPORT_EVERY_S)

    async def forget(self) -> None:
        try:
            await self.store.forget_process(self.id)
        except StoreError as exc:
            log.info("could not remove this process's report (it ages out): %s", exc)

    async def consistency(self) -> PolicyConsistency:
        """What qpu://policy tells an agent: this process's policy hashes and whether the others agree."""
        live = await self.store.processes(time.time() - LIVE_FOR_S)
        stamps = {r.policy_stamp for r in live if r.id != self.id} | {
            (self.policy.sha256, self.policy.overrides_sha256)
        }
        agree = len(stamps) == 1
        return PolicyConsistency(
            policy_sha256=self.policy.sha256,
            overrides_sha256=self.policy.overrides_sha256,
            processes=len({r.id for r in live} | {self.id}),
            policies=len(stamps),
            agree=agree,
            warning=None
            if agree
            else (
                "The gateway's processes do not all run the same policy; a call may be judged by another "
                "policy than this one. The operator has been warned."
            ),
        )
