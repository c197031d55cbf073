"""The audit hash chain: how a row's hash is computed, and a verifier that finds the first broken link.

Each row stores `prev_hash` (the hash of the row before it, or `GENESIS` for the first hashed
row) and `row_hash = sha256(prev_hash || canonical JSON of its content)`. The content includes
`seq`, so a row moved to another position no longer matches its hash, and, on an operator's act,
the operator. Everything here is pure: the store computes hashes inside its write transaction,
the CLI feeds the verifier pages of rows.

A chain is evidence against an attacker who edits rows without recomputing every later hash. One
who rewrites the whole tail is caught only by a head recorded elsewhere (`audit verify` prints
it; `--anchor SEQ:HASH` checks it) or by the rows already shipped with `audit export`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from qpu_gateway.store.records import AuditRecord

if TYPE_CHECKING:  # the stores import this module for its hashing
    from qpu_gateway.store import Store

GENESIS = "0" * 64  # the prev_hash of the first hashed row
CONTENT = ("seq", "at", "agent", "project", "key_id", "tool", "decision", "error_code", "args_hash", "job_id", "detail")
# Hashed only when set (migration 0004 added it), so rows written before it keep their hashes.
OPTIONAL_CONTENT = ("operator",)
# After a break, how many later rows the verifier reads to tell a reordering from an edit.
LOOKAHEAD = 1000

BreakKind = Literal["changed", "missing", "reordered", "unhashed", "truncated", "anchor"]


def canonical(content: Mapping[str, Any]) -> bytes:
    """The stable serialisation a row's hash covers: its content fields as compact, key-sorted JSON."""
    fields = {name: content[name] for name in CONTENT}
    fields.update({name: content[name] for name in OPTIONAL_CONTENT if content.get(name) is not None})
    fields["seq"] = int(fields["seq"])
    fields["at"] = float(fields["at"])  # SQLite REAL hands back a float whatever was stored
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")


def chain_hash(prev_hash: str, content: Mapping[str, Any]) -> str:
    """sha256(prev_hash || canonical content), hex."""
    return hashlib.sha256(prev_hash.encode("ascii") + canonical(content)).hexdigest()


def content_of(row: AuditRecord, *, seq: int | None = None) -> dict[str, Any]:
    """A stored row's hashed content; with `seq`, as if it stood at that position."""
    content = {name: getattr(row, name) for name in (*CONTENT, *OPTIONAL_CONTENT)}
    if seq is not None:
        content["seq"] = seq
    return content


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first link that does not hold: where, what kind, and a sentence for the operator."""

    seq: int
    kind: BreakKind
    message: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    rows: int  # rows read, legacy rows included
    legacy_rows: int  # rows written before the chain existed (no hashes), all at the start
    head_seq: int | None  # the last row whose link was checked
    head_hash: str | None
    broken: ChainBreak | None

    @property
    def intact(self) -> bool:
        return self.broken is None


@dataclass
class _Suspect:
    row: AuditRecord
    expected_prev: str
    link_ok: bool
    content_ok: bool
    later: list[AuditRecord] = field(default_factory=list)


class ChainVerifier:
    """Checks rows fed in seq order, page by page, and stops at the first broken link.

    `anchor` is a (seq, row_hash) pair recorded earlier, e.g. from a previous `audit verify`: the
    row at that seq must still carry that hash, which also catches a truncated or rewritten tail.
    """

    def __init__(self, *, anchor: tuple[int, str] | None = None, lookahead: int = LOOKAHEAD) -> None:
        self._anchor = anchor
        self._lookahead = lookahead
        self._rows = 0
        self._legacy = 0
        self._last_seq: int | None = None
        self._last_hash: str | None = None  # None until the first hashed row
        self._first_hashed: int | None = None
        self._suspect: _Suspect | None = None
        self._broken: ChainBreak | None = None

    @property
    def wants_more(self) -> bool:
        """False once the first break is found and explained: the caller can stop reading."""
        if self._broken is not None:
            return False
        return self._suspect is None or len(self._suspect.later) < self._lookahead

    def feed(self, rows: Iterable[AuditRecord]) -> bool:
        """Check the next rows (in seq order); return `wants_more`."""
        for row in rows:
            if not self.wants_more:
                break
            if self._suspect is not None:
                self._suspect.later.append(row)
            else:
                self._check(row)
        if self._suspect is not None and not self.wants_more:
            self._broken = _explain(self._suspect)
        return self.wants_more

    def finish(self, highest_seq: int) -> ChainReport:
        """The verdict once every row was fed; `highest_seq` is the highest seq the log ever assigned."""
        if self._suspect is not None and self._broken is None:
            self._broken = _explain(self._suspect)
        last = self._last_seq or 0
        if self._broken is None and highest_seq > last:
            gone = highest_seq - last
            self._broken = ChainBreak(
                last + 1,
                "truncated",
                f"the log ends at seq {last} but had reached seq {highest_seq}: "
                f"{gone} row{'s' if gone != 1 else ''} at the end {'were' if gone != 1 else 'was'} deleted",
            )
        if self._broken is None and self._anchor is not None and self._anchor[0] > last:
            self._broken = ChainBreak(
                self._anchor[0],
                "truncated",
                f"the anchored row seq {self._anchor[0]} is gone: the log ends at seq {last}",
            )
        return ChainReport(
            rows=self._rows,
            legacy_rows=self._legacy,
            head_seq=self._last_seq if self._last_hash is not None else None,
            head_hash=self._last_hash,
            broken=self._broken,
        )

    def _check(self, row: AuditRecord) -> None:
        self._rows += 1
        expected_seq = (self._last_seq or 0) + 1
        if row.seq != expected_seq:
            lost = row.seq - expected_seq
            self._broken = ChainBreak(
                row.seq,
                "missing",
                f"row missing: seq jumps from {self._last_seq or 0} to {row.seq} "
                f"({lost} row{'s' if lost != 1 else ''} deleted)",
            )
            return
        if row.row_hash is None:
            if self._last_hash is not None:
                self._broken = ChainBreak(
                    row.seq,
                    "unhashed",
                    f"seq {row.seq} has no hash although the chain starts at seq {self._first_hashed}: "
                    "its hashes were removed",
                )
                return
            self._legacy += 1
            self._last_seq = row.seq
            return
        expected_prev = self._last_hash or GENESIS
        link_ok = row.prev_hash == expected_prev
        content_ok = chain_hash(row.prev_hash or "", content_of(row)) == row.row_hash
        if not (link_ok and content_ok):
            self._suspect = _Suspect(row, expected_prev, link_ok, content_ok)
            return
        if self._anchor is not None and row.seq == self._anchor[0] and row.row_hash != self._anchor[1]:
            self._broken = ChainBreak(
                row.seq,
                "anchor",
                f"seq {row.seq} hashes to {row.row_hash}, not the anchored {self._anchor[1]}: "
                f"the log was rewritten up to seq {row.seq}",
            )
            return
        if self._first_hashed is None:
            self._first_hashed = row.seq
        self._last_seq, self._last_hash = row.seq, row.row_hash


def _explain(suspect: _Suspect) -> ChainBreak:
    """Name what is wrong with the first row that does not fit the chain."""
    row, seq = suspect.row, suspect.row.seq
    # A reordering: the content that belongs at this position (hashing correctly here) is at another seq.
    for later in suspect.later:
        if chain_hash(suspect.expected_prev, content_of(later, seq=seq)) in (later.row_hash, row.row_hash):
            return ChainBreak(
                seq, "reordered", f"rows reordered: the row that belongs at seq {seq} is at seq {later.seq}"
            )
    if suspect.link_ok:
        return ChainBreak(seq, "changed", f"content changed: seq {seq} no longer matches its hash")
    if suspect.content_ok:
        before = "the start of the chain" if suspect.expected_prev == GENESIS else f"seq {seq - 1}"
        return ChainBreak(
            seq,
            "missing",
            f"row missing or replaced: seq {seq}'s prev_hash does not match {before} "
            "(a row before it was deleted, or rewritten with a new hash)",
        )
    return ChainBreak(seq, "changed", f"content changed: seq {seq} matches neither its hash nor its predecessor")


def args_hash(value: Any) -> str:
    """sha256 of the canonical JSON of a call's arguments: what was asked, without storing it."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8", errors="replace")).hexdigest()


async def verify_log(store: Store, *, anchor: tuple[int, str] | None = None) -> ChainReport:
    """`store`'s whole audit log checked, a page at a time, stopping at the first broken link."""
    # The high-water mark first: rows appended while the pages are read are never taken for a cut tail.
    highest = await store.audit_highest_seq()
    verifier = ChainVerifier(anchor=anchor)
    async with aclosing(store.audit_pages()) as pages:
        async for page in pages:
            if not verifier.feed(page):
                break
    return verifier.finish(highest)


def exported(row: AuditRecord) -> dict[str, Any]:
    """One audit row as a SIEM reads it: every stored field, its hashes, and the time in ISO 8601."""
    when = datetime.fromtimestamp(row.at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return {"seq": row.seq, "at": row.at, "time": when, **dataclasses.asdict(row)}
