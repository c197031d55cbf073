"""Operators, their passwords and sessions, CSRF tokens and the login rate limit.

Passwords are kept as scrypt hashes with a salt per operator; a session id lives only in the
operator's cookie (the store keeps its sha256), and its CSRF token is an HMAC of it, so neither
is ever written down anywhere an attacker could read it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import anyio
import limits
from limits.aio.strategies import MovingWindowRateLimiter

from qpu_gateway.audit.operators import operator_entry
from qpu_gateway.keys import validate_name
from qpu_gateway.store import Store
from qpu_gateway.store.records import OperatorRecord, SessionRecord

ROLES = ("viewer", "approver", "admin")  # each may do what the one before it may, and more
# scrypt's cost: 2^15 x 8 blocks is 32 MiB and about 0.1 s per guess on one core, which makes a
# stolen table slow to crack and a login still quick.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024
MIN_PASSWORD = 12
IDLE_S = 30 * 60.0  # a session unused this long is over
TOUCH_EVERY_S = 30.0  # its last use is written at most this often (idle expiry needs no more)
# Failed logins allowed per operator name and per client address before both wait.
LOGIN_FAILURES = limits.parse("5/15 minutes")


class AuthError(Exception):
    """A refusal of an operator's request, with the HTTP status and a code (errors as values)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """`scrypt$N$r$p$salt$hash` (hex) of a password, with a new random salt unless one is given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=SCRYPT_MAXMEM, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def password_matches(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` was made from (compared in constant time)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), maxmem=SCRYPT_MAXMEM, dklen=32
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


# Checked against for a name that has no operator, so a refusal takes as long either way and the
# time of an answer does not tell which names exist. Made at the first login, not at import (0.1 s).
_NOBODY: list[str] = []


def _nobody() -> str:
    if not _NOBODY:
        _NOBODY.append(hash_password(secrets.token_urlsafe(16)))
    return _NOBODY[0]


def may(role: str, needed: str) -> bool:
    """Whether an operator of `role` may do what needs `needed`."""
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)


def audit_name(operator: str) -> str:
    """How a console operator is named on audit rows: beside OS users, who act through the CLI."""
    return f"{operator} (console)"


async def create_operator(store: Store, name: str, role: str, password: str, *, by: str) -> OperatorRecord:
    """Store a new operator; ValueError for a bad name, role or short password, or a name taken."""
    validate_name("operator", name)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"the password must be at least {MIN_PASSWORD} characters")
    record = OperatorRecord(name=name, role=role, password_hash=hash_password(password), created_at=time.time())
    entry = operator_entry("operators.create", by, detail=f"console operator {name} ({role}) created by {by}")
    if not await store.insert_operator(record, entry):
        raise ValueError(f"an operator named {name!r} exists already")
    return record


async def disable_operator(store: Store, name: str, *, by: str) -> None:
    """Disable an operator (no more logins, its sessions end); ValueError if there is none enabled."""
    entry = operator_entry("operators.disable", by, detail=f"console operator {name} disabled by {by}")
    if not await store.disable_operator(name, time.time(), entry):
        raise ValueError(f"no enabled operator named {name!r} (see `qpu-gateway operators list`)")


def session_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def csrf_token(session_id: str) -> str:
    """The session's CSRF token: derived from the id, so only the holder of the cookie can make it."""
    return hmac.new(session_id.encode(), b"qpu-gateway console csrf", hashlib.sha256).hexdigest()


def csrf_ok(session_id: str, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(csrf_token(session_id), sent)


@dataclass(frozen=True, slots=True)
class SignedIn:
    """The operator behind a request, and its session id (for its CSRF token; never logged)."""

    operator: OperatorRecord
    session_id: str

    @property
    def csrf(self) -> str:
        return csrf_token(self.session_id)

    @property
    def by(self) -> str:
        return audit_name(self.operator.name)


class Sessions:
    """Logins (rate limited per name and per client), sessions and their idle expiry."""

    def __init__(self, store: Store, strategy: MovingWindowRateLimiter, namespace: str) -> None:
        self.store = store
        self.strategy = strategy
        self.namespace = namespace

    async def login(self, name: str, password: str, client: str) -> str:
        """A new session id for a right name and password; AuthError otherwise. Every outcome is audited."""
        try:
            validate_name("operator", name)
        except ValueError:
            name = "(invalid name)"
        keys = [(self.namespace, "console-login", "name", name), (self.namespace, "console-login", "client", client)]
        for key in keys:
            if not await self.strategy.test(LOGIN_FAILURES, *key):
                await self._audit(name, client, "rate_limited", "too many failed logins")
                raise AuthError(
                    429, "rate_limited", "Too many failed logins for this name or from this address: wait 15 minutes."
                )
        operator = await self.store.operator(name)
        stored = operator.password_hash if operator else _nobody()
        # 0.1 s of scrypt, in a thread: the gateway's MCP calls share this event loop.
        right = await anyio.to_thread.run_sync(password_matches, password, stored)
        if operator is None or not right or operator.disabled_at is not None:
            for key in keys:
                await self.strategy.hit(LOGIN_FAILURES, *key)
            await self._audit(name, client, "unauthorized", "wrong name or password, or operator disabled")
            raise AuthError(401, "unauthorized", "Wrong name or password.")
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        await self.store.start_session(SessionRecord(session_hash(session_id), name, now, now), now - IDLE_S)
        await self._audit(name, client, None, f"signed in as {operator.role}")
        return session_id

    async def _audit(self, name: str, client: str, code: str | None, why: str) -> None:
        entry = operator_entry(
            "console.login",
            audit_name(name),
            decision="ok" if code is None else "refused",
            error_code=code,
            detail=f"{why}, from {client}",
        )
        await self.store.append_audit(entry, time.time())

    async def signed_in(self, session_id: str | None) -> SignedIn | None:
        """The operator of a live session, or None (unknown, idle too long, operator disabled)."""
        if not session_id:
            return None
        found = await self.store.session(session_hash(session_id))
        if found is None:
            return None
        session, operator = found
        now = time.time()
        if operator.disabled_at is not None or now - session.seen_at > IDLE_S:
            await self.store.end_session(session.id_hash)
            return None
        if now - session.seen_at > TOUCH_EVERY_S:
            await self.store.touch_session(session.id_hash, now)
        return SignedIn(operator, session_id)

    async def logout(self, who: SignedIn) -> None:
        await self.store.end_session(session_hash(who.session_id))
        await self.store.append_audit(
            operator_entry("console.logout", who.by, detail="signed out"),
            time.time(),
        )
