"""Structured logs on stderr (stdout is the stdio transport), with secrets redacted.

Each record is one JSON object per line. Every message and exception text passes through
`redact` first, so a gateway key or a provider credential never reaches a log, whatever code
logged it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

# Gateway keys look like "qpg_<key id>_<secret>"; see server/keys.py.
_KEY_PATTERN = re.compile(r"qpg_[A-Za-z0-9]+_[A-Za-z0-9_\-]{16,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"']+")
# Provider credentials, by the variable names their SDKs read.
SECRET_ENV_VARS = (
    "QPU_GATEWAY_KEY",
    "QISKIT_IBM_TOKEN",
    "IBM_QUANTUM_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_QUANTUM_CONNECTION_STRING",
)
REDACTED = "[redacted]"


def redact(text: str) -> str:
    """`text` with gateway keys, bearer tokens and known provider secrets replaced."""
    text = _KEY_PATTERN.sub(REDACTED, text)
    text = _BEARER.sub(r"\1" + REDACTED, text)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, REDACTED)
    return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in self._STANDARD and not key.startswith("_"):
                entry[key] = value if isinstance(value, int | float | bool | None) else redact(str(value))
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def setup(level: str = "INFO") -> None:
    """Send every logger to stderr as JSON at `level`; replaces handlers others installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter at INFO is noise in an agent's inner loop.
    for noisy in ("httpx", "httpx2", "uvicorn.access", "qiskit", "stevedore", "mcp.server.streamable_http"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
