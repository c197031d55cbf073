"""Gateway keys are shown once and stored as hashes; logs never carry a key or a provider secret."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path

import anyio
import pytest

from qpu_gateway.errors import Unauthorized
from qpu_gateway.keys import SCOPES, Principal, authenticate, create_key
from qpu_gateway.store import Store, open_store
from qpu_gateway.telemetry.logs import REDACTED, JsonFormatter, redact

pytestmark = pytest.mark.anyio

ALL_SCOPES = frozenset(SCOPES)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(db_path)
    yield opened
    await opened.close()


async def refusal_for(store: Store, key: str | None) -> str:
    with pytest.raises(Unauthorized) as refused:
        await authenticate(store, key)
    return refused.value.message


# -- keys ---------------------------------------------------------------------------------------------


async def test_a_new_key_is_returned_once_and_only_its_hash_is_stored(store: Store, db_path: Path) -> None:
    record, key = await create_key(store, agent="alice", project="lab", scopes=frozenset({"read", "submit"}))

    assert key.startswith(f"qpg_{record.id}_")
    assert record.secret_hash == hashlib.sha256(key.encode()).hexdigest()
    secret = key.removeprefix(f"qpg_{record.id}_")
    with closing(sqlite3.connect(db_path)) as db:
        [row] = db.execute("SELECT * FROM keys").fetchall()
    stored_text = " ".join(str(value) for value in row)
    assert record.secret_hash in stored_text
    assert key not in stored_text and secret not in stored_text


async def test_two_keys_for_one_agent_are_different(store: Store) -> None:
    first = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES)
    second = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES)

    assert first[1] != second[1] and first[0].id != second[0].id
    assert await store.key_count() == 2


async def test_a_valid_key_authenticates_as_its_principal(store: Store) -> None:
    record, key = await create_key(store, agent="alice", project="lab", scopes=frozenset({"read", "estimate"}))

    principal = await authenticate(store, key)

    assert principal == Principal(
        agent="alice", project="lab", scopes=frozenset({"read", "estimate"}), key_id=record.id
    )
    assert await authenticate(store, f"  {key}\n") == principal  # pasted with whitespace


@pytest.mark.parametrize("name", ["", "-starts-with-dash", "has space", "x" * 65, "a/b", "x'); DROP TABLE keys;--"])
async def test_a_key_for_a_malformed_agent_name_is_not_created(store: Store, name: str) -> None:
    with pytest.raises(ValueError, match="agent must be"):
        await create_key(store, agent=name, project="lab", scopes=ALL_SCOPES)

    assert await store.key_count() == 0


async def test_a_wrong_secret_for_a_real_key_id_is_refused_without_echoing_it(store: Store) -> None:
    record, key = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES)
    forged = f"qpg_{record.id}_{'A' * 43}"
    assert forged != key

    message = await refusal_for(store, forged)

    assert "not valid" in message
    assert forged not in message and key not in message and "A" * 43 not in message


async def test_a_well_formed_key_for_an_unknown_id_is_refused(store: Store) -> None:
    await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES)

    message = await refusal_for(store, f"qpg_{'0' * 12}_{'B' * 43}")

    assert "not valid" in message and "B" * 43 not in message


@pytest.mark.parametrize(
    "malformed",
    ["hello", "qpg_", "qpg_short_secret", "Bearer qpg_x", "qpg_ABCDEF123456_" + "c" * 43, "sk-" + "d" * 48],
)
async def test_a_malformed_key_is_refused_without_echoing_it(store: Store, malformed: str) -> None:
    message = await refusal_for(store, malformed)

    assert "not valid" in message
    assert malformed not in message


@pytest.mark.parametrize("missing", [None, ""])
async def test_no_key_is_refused_with_how_to_get_one(store: Store, missing: str | None) -> None:
    message = await refusal_for(store, missing)

    assert "No gateway key was given" in message and "QPU_GATEWAY_KEY" in message


async def test_a_revoked_key_is_refused_at_once_and_says_revoked(store: Store) -> None:
    record, key = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES)
    await authenticate(store, key)

    assert await store.revoke_key(record.id, time.time()) is True
    message = await refusal_for(store, key)

    assert f"The gateway key {record.id} has been revoked" in message
    assert key not in message and key.removeprefix(f"qpg_{record.id}_") not in message
    assert await store.revoke_key(record.id, time.time()) is False  # already revoked


async def test_an_expired_key_is_refused_and_says_expired(store: Store) -> None:
    record, key = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES, ttl_s=0.001)
    assert record.expires_at is not None
    await anyio.sleep(0.01)

    message = await refusal_for(store, key)

    assert f"The gateway key {record.id} has expired" in message
    assert key not in message


async def test_a_key_within_its_lifetime_is_accepted(store: Store) -> None:
    record, key = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES, ttl_s=3600)

    assert (await authenticate(store, key)).key_id == record.id


# -- redaction ----------------------------------------------------------------------------------------

A_KEY = "qpg_0a1b2c3d4e5f_" + "Zx9-_" * 8 + "abc"  # the shape create_key makes: 12-char id, 43-char secret
IBM_TOKEN = "ibm-token-5f2c9a7e1d3b4c6a8e0f"


def test_redact_removes_a_gateway_key_wherever_it_appears() -> None:
    text = f"authenticating with {A_KEY}, then again ({A_KEY})."

    redacted = redact(text)

    assert A_KEY not in redacted and A_KEY[17:] not in redacted
    assert redacted == f"authenticating with {REDACTED}, then again ({REDACTED})."


async def test_redact_removes_a_key_made_by_create_key(store: Store) -> None:
    _, key = await create_key(store, agent="alice", project="lab", scopes=ALL_SCOPES)

    assert redact(f"key={key};") == f"key={REDACTED};"


@pytest.mark.parametrize(
    "header",
    ["Authorization: Bearer eyJhbGciOi.payload.sig", "authorization: bearer opaque-token-123", '"Bearer abc123"'],
)
def test_redact_removes_a_bearer_token(header: str) -> None:
    token = header.split()[-1].strip('"')

    redacted = redact(header)

    assert token not in redacted
    assert REDACTED in redacted


def test_redact_removes_a_provider_token_set_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QISKIT_IBM_TOKEN", IBM_TOKEN)

    redacted = redact(f"IBM said 401 for token {IBM_TOKEN} at https://quantum.cloud.ibm.com")

    assert IBM_TOKEN not in redacted
    assert redacted == f"IBM said 401 for token {REDACTED} at https://quantum.cloud.ibm.com"


def test_redact_leaves_ordinary_text_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QISKIT_IBM_TOKEN", raising=False)
    text = "job job_0123456789abcdef0123 claimed by worker-a on aer/simulator (qpg keys are secret)"

    assert redact(text) == text


# -- the JSON log formatter ---------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A real logger writing JSON lines through the gateway's formatter into a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("qpu_gateway.tests.redaction")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, buffer
    logger.removeHandler(handler)


def entries(buffer: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def test_the_json_formatter_redacts_a_key_in_the_message_and_its_arguments(log_lines) -> None:
    logger, buffer = log_lines

    logger.warning(f"bad key {A_KEY}")
    logger.warning("bad key %s from %s", A_KEY, "alice")

    assert A_KEY not in buffer.getvalue()
    first, second = entries(buffer)
    assert first["msg"] == f"bad key {REDACTED}"
    assert second["msg"] == f"bad key {REDACTED} from alice"
    assert (second["level"], second["logger"]) == ("warning", "qpu_gateway.tests.redaction")


def test_the_json_formatter_redacts_secrets_inside_exception_text(log_lines, monkeypatch: pytest.MonkeyPatch) -> None:
    logger, buffer = log_lines
    monkeypatch.setenv("QISKIT_IBM_TOKEN", IBM_TOKEN)

    try:
        raise RuntimeError(f"provider refused {IBM_TOKEN}; client sent Authorization: Bearer {A_KEY}")
    except RuntimeError:
        logger.exception("submission failed")

    assert IBM_TOKEN not in buffer.getvalue() and A_KEY not in buffer.getvalue()
    [entry] = entries(buffer)
    assert entry["msg"] == "submission failed"
    assert "RuntimeError: provider refused [redacted]; client sent Authorization: Bearer [redacted]" in str(
        entry["exc"]
    )


def test_the_json_formatter_redacts_extra_fields_but_keeps_numbers(log_lines) -> None:
    logger, buffer = log_lines

    logger.info("claimed", extra={"job_id": "job_1", "header": f"Bearer {A_KEY}", "try": 2, "wait_s": 0.5})

    [entry] = entries(buffer)
    assert entry["header"] == f"Bearer {REDACTED}"
    assert (entry["job_id"], entry["try"], entry["wait_s"]) == ("job_1", 2, 0.5)
