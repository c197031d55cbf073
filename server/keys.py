"""Gateway keys: random, shown once, stored as a hash, each naming one principal.

A key reads `qpg_<id>_<secret>`. The id is public (listings, audit rows) and finds the row;
the whole key's sha256 is compared in constant time. 32 random bytes make a slow hash
unnecessary: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import time
from dataclasses import dataclass

from qpu_gateway.audit.operators import operator_entry
from qpu_gateway.errors import Unauthorized
from qpu_gateway.store import Store, StoreError
from qpu_gateway.store.records import AuditEntry, KeyRecord, Pause

log = logging.getLogger(__name__)

SCOPES = ("submit", "read", "cancel", "estimate")
_KEY = re.compile(r"\Aqpg_([a-z0-9]{12})_([A-Za-z0-9_\-]{43})\Z")
# \Z, not $: `$` also matches before a trailing newline, which let "alice\n" through.
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}\Z")

HOW_TO_GET_A_KEY = (
    "Ask the gateway's operator for a key (`qpu-gateway keys create --agent NAME`), then set it as "
    "QPU_GATEWAY_KEY in this server's environment (stdio, e.g. the `env` of mcp.json) or send it as "
    "`Authorization: Bearer KEY` (HTTP)."
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the agent, its project, what it may do, and the key it used."""

    agent: str
    project: str
    scopes: frozenset[str]
    key_id: str
    paused: Pause | None = None  # an operator paused the agent: its every call is refused (server/jobs/pauses.py)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{kind} must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(s.strip() for s in text.split(",") if s.strip())
    unknown = scopes - set(SCOPES)
    if unknown or not scopes:
        raise ValueError(f"scopes must be a comma-separated subset of {','.join(SCOPES)}")
    return scopes


async def create_key(
    store: Store,
    *,
    agent: str,
    project: str,
    scopes: frozenset[str],
    ttl_s: float | None = None,
    by: str | None = None,
) -> tuple[KeyRecord, str]:
    """Store a new key's hash and return the record and the key itself (shown once, never stored).

    `by` names the operator creating it: the key and a `keys.create` audit row are then stored together.
    """
    validate_name("agent", agent)
    validate_name("project", project)
    key_id = secrets.token_hex(6)
    key = f"qpg_{key_id}_{secrets.token_urlsafe(32)}"
    now = time.time()
    record = KeyRecord(
        id=key_id,
        secret_hash=hash_key(key),
        agent=agent,
        project=project,
        scopes=scopes,
        created_at=now,
        expires_at=None if ttl_s is None else now + ttl_s,
    )
    audit = None
    if by is not None:
        expiry = "never expires" if ttl_s is None else f"expires after {ttl_s:g} s"
        audit = operator_entry(
            "keys.create",
            by,
            detail=f"key created by operator {by}: scopes {','.join(sorted(scopes))}, {expiry}",
            agent=agent,
            project=project,
            key_id=key_id,
        )
    await store.insert_key(record, audit)
    return record, key


# "Last used" is for operators spotting idle keys, so a minute's precision is plenty and saves a
# write on every call.
TOUCH_EVERY_S = 60.0


async def rotate_key(store: Store, key_id: str, *, by: str | None = None) -> str:
    """A new secret for key `key_id` (same id, agent, scopes); the old secret stops working now.

    With `by` (the operator), a `keys.rotate` audit row is written with the change.
    """
    key = f"qpg_{key_id}_{secrets.token_urlsafe(32)}"
    if not await store.rotate_key(key_id, hash_key(key), await _key_entry(store, "rotate", key_id, by)):
        raise ValueError(f"no active key with id {key_id!r}")
    return key


async def revoke_key(store: Store, key_id: str, *, by: str | None = None) -> bool:
    """Revoke key `key_id` (every process refuses it from its next call); False if no active key has that id."""
    return await store.revoke_key(key_id, time.time(), await _key_entry(store, "revoke", key_id, by))


async def _key_entry(store: Store, act: str, key_id: str, by: str | None) -> AuditEntry | None:
    """The audit row of an operator's `act` (rotate, revoke) on a key, naming the key's agent."""
    if by is None:
        return None
    record = await store.key_by_id(key_id)
    return operator_entry(
        f"keys.{act}",
        by,
        detail=f"key {key_id} {act}d by operator {by}",
        agent=record.agent if record else None,
        project=record.project if record else None,
        key_id=key_id,
    )


async def authenticate(store: Store, key: str | None) -> Principal:
    """The principal for `key`, checked against the store on every call so revocation is immediate."""
    if not key:
        raise Unauthorized(f"No gateway key was given. {HOW_TO_GET_A_KEY}")
    match = _KEY.match(key.strip())
    record = await store.key_by_id(match.group(1)) if match else None
    if record is None or not hmac.compare_digest(record.secret_hash, hash_key(key.strip())):
        raise Unauthorized(f"The gateway key is not valid. {HOW_TO_GET_A_KEY}")
    if record.revoked_at is not None:
        raise Unauthorized(f"The gateway key {record.id} has been revoked. {HOW_TO_GET_A_KEY}")
    now = time.time()
    if record.expires_at is not None and record.expires_at <= now:
        raise Unauthorized(f"The gateway key {record.id} has expired. {HOW_TO_GET_A_KEY}")
    if record.last_used_at is None or now - record.last_used_at > TOUCH_EVERY_S:
        try:
            await store.touch_key(record.id, now)
        except StoreError as exc:
            # "Last used" is advisory: a database too busy (or full) to note it must not turn a
            # valid key away. The next call notes it.
            log.info("could not note the key's last use: %s", exc)
    return Principal(
        agent=record.agent, project=record.project, scopes=record.scopes, key_id=record.id, paused=record.agent_pause
    )
