"""The policy file watcher (server/jobs/policy_source.py) on a real file: what it applies and reports."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from qpu_gateway.jobs import policy_source
from qpu_gateway.jobs.policy_source import PolicySource
from qpu_gateway.policy.file import Policy, load_policy

FIRST = '[defaults]\nallowed_backends = ["aer/*"]\n'
SECOND = '[defaults]\nallowed_backends = ["aer/*"]\nmax_shots = 5000\n'
BAD = "[defaults]\nmax_depth = 'deep'\n"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_an_edit_is_applied_and_reported_with_the_hash_of_what_was_parsed(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(FIRST, encoding="utf-8")
    source = PolicySource(path)
    assert source.reload_if_changed() is None  # nothing changed since it was read

    path.write_text(SECOND, encoding="utf-8")
    applied = source.reload_if_changed()
    path.write_text(BAD, encoding="utf-8")
    refused = source.reload_if_changed()

    assert applied is not None and applied.applied and applied.policy_sha256 == sha(SECOND)
    assert source.current.rules_for(agent="anyone", project="default").max_shots == 5000
    assert refused is not None and not refused.applied and refused.policy_sha256 == sha(BAD)
    assert "max_depth" in (refused.error or "")
    assert source.current.rules_for(agent="anyone", project="default").max_shots == 5000  # the last good one stays


def test_a_write_landing_while_the_file_is_read_is_neither_applied_nor_reported_until_it_holds_still(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(FIRST, encoding="utf-8")
    source = PolicySource(path)
    writes = [BAD]  # an editor finishing its in-place write between the hash and the parse

    def read_while_written(at: Path) -> Policy:
        if writes:
            at.write_text(writes.pop(), encoding="utf-8")
        return load_policy(at)

    monkeypatch.setattr(policy_source, "load_policy", read_while_written)
    path.write_text(SECOND, encoding="utf-8")
    torn = source.reload_if_changed()
    settled = source.reload_if_changed()

    assert torn is None  # what was hashed (SECOND) is not what was parsed (BAD): nothing reported
    assert settled is not None and not settled.applied and settled.policy_sha256 == sha(BAD)
    assert source.current.rules_for(agent="anyone", project="default").max_shots == 100_000  # FIRST still rules


def test_a_refusal_gives_its_reason_within_the_audit_rows_length_however_deep_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / ("deep-" * 12) / ("folder-" * 8)  # some 200 characters, as test runners' are
    folder.mkdir(parents=True)
    path = folder / "policy.toml"
    path.write_text(FIRST, encoding="utf-8")
    source = PolicySource(path)
    path.write_text(BAD, encoding="utf-8")
    refused = source.reload_if_changed()

    assert refused is not None and not refused.applied
    line = refused.describe()
    assert len(line) <= 500, len(line)
    assert f"sha256 {sha(BAD)}" in line and line.endswith(
        "policy file: line 2: defaults.max_depth: " + line.split("defaults.max_depth: ", 1)[1]
    )
    assert "max_depth" in line and line.count(str(path)) == 1
