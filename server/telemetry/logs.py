"""Structured logs on stderr (stdout is the stdio transport), with secrets redacted.

Each record is one JSON object per line. Every message and exception text passes through
`redact` first, so a gateway key or a provider credential never reaches a log, whatever code
logged it. A serving process also holds every other line that reaches stderr to that shape:
third-party loggers with console handlers of their own (qiskit-ibm-runtime attaches one at
import, printing `management.get:INFO:...`), Python warnings, uncaught exceptions in threads,
and text that code prints (`structured_streams`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import types
from typing import Any, BinaryIO, TextIO, cast

# Gateway keys look like "qpg_<key id>_<secret>"; see server/keys.py.
_KEY_PATTERN = re.compile(r"qpg_[A-Za-z0-9]+_[A-Za-z0-9_\-]{16,}")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"']+")
# A URL's password (`postgresql://user:PASSWORD@host/db`, `redis://:PASSWORD@host`) and a libpq
# connection string's `password=...` option, wherever a database location is shown.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@\"']*:)[^\s/\"']+@")
_OPTION_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&'\"]+)")
# Provider credentials, by the variable names their SDKs read.
SECRET_ENV_VARS = (
    "QPU_GATEWAY_KEY",
    "QISKIT_IBM_TOKEN",
    "IBM_QUANTUM_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_QUANTUM_CONNECTION_STRING",
    "PGPASSWORD",
)
REDACTED = "[redacted]"


def redact_credentials(text: str) -> str:
    """`text` with passwords in URLs (`scheme://user:PASSWORD@`) and `password=` options replaced."""
    text = _URL_PASSWORD.sub(r"\1" + REDACTED + "@", text)
    return _OPTION_PASSWORD.sub(r"\1" + REDACTED, text)


def redact(text: str) -> str:
    """`text` with gateway keys, bearer tokens, database passwords and known provider secrets replaced."""
    text = _KEY_PATTERN.sub(REDACTED, text)
    text = redact_credentials(text)
    text = _BEARER.sub(r"\1" + REDACTED, text)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name)
        if value and len(value) >= 8:
            text = text.replace(value, REDACTED)
    return text


def _stamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    _STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _stamp(record.created),
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


_LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARN|WARNING|ERROR|CRITICAL|FATAL)\b")
_LEVELS = {"WARN": "warning", "FATAL": "critical"}


class JsonLines:
    """A text stream that turns every line written to it into one JSON object on `target`.

    Lines that already are JSON objects (our own records, and console handlers this module
    re-formatted) pass through unchanged. Anything else (a library's own formatter, a print, a
    warning shown the old way) becomes `{"ts", "level", "logger": "stderr", "msg"}`, its level
    read from a level word in the line where there is one. The first such line also sends every
    third-party console handler through `JsonFormatter`, so the lines after it keep their level
    and logger name. It has only what writers of `sys.stderr` use (write, flush, fileno, ...).
    """

    def __init__(self, target: TextIO, *, source: str = "stderr", buffer: BinaryIO | None = None) -> None:
        self.target = target
        self.encoding = getattr(target, "encoding", None) or "utf-8"
        self.errors = "backslashreplace"
        # The byte stream below, for code that writes bytes (the MCP SDK claims sys.stdout's).
        self.buffer = buffer if buffer is not None else getattr(target, "buffer", None)
        self._source = source
        self._partial = ""
        self._lock = threading.Lock()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.target.fileno()

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._emit(line)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self._emit(self._partial)
                self._partial = ""
        self.flush()

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        if line.startswith("{"):
            try:
                if isinstance(json.loads(line), dict):
                    self.target.write(line + "\n")
                    return
            except ValueError:
                pass
        structure_console_handlers()
        word = _LEVEL_WORD.search(line[:120])
        level = "warning" if word is None else _LEVELS.get(word.group(1), word.group(1).lower())
        entry = {"ts": _stamp(time.time()), "level": level, "logger": self._source, "msg": redact(line.rstrip())}
        self.target.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.target.flush()


def _console_streams() -> tuple[object, ...]:
    streams: list[object] = [sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__]
    streams += [s.target for s in streams if isinstance(s, JsonLines)]
    return tuple(s for s in streams if s is not None)


def structure_console_handlers() -> int:
    """Send every console handler that other code attached to its own loggers through
    `JsonFormatter`; returns how many were changed. File handlers are the operator's choice."""
    consoles = _console_streams()
    changed = 0
    loggers = [logging.getLogger()] + [
        each for each in logging.Logger.manager.loggerDict.values() if isinstance(each, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if (
                type(handler) is logging.StreamHandler
                and any(handler.stream is stream for stream in consoles)
                and not isinstance(handler.formatter, JsonFormatter)
            ):
                handler.setFormatter(JsonFormatter())
                changed += 1
    return changed


_UNCAUGHT = logging.getLogger("qpu_gateway.uncaught")


def _log_thread_exception(info: threading.ExceptHookArgs) -> None:
    """threading's default hook prints a bare traceback; this logs it as one JSON record."""
    if info.exc_type is SystemExit:
        return
    name = info.thread.name if info.thread is not None else "?"
    failure = (info.exc_type, info.exc_value, info.exc_traceback)
    _UNCAUGHT.error("uncaught exception in thread %s", name, exc_info=failure)  # type: ignore[arg-type]


def _log_process_exception(kind: type[BaseException], value: BaseException, tb: types.TracebackType | None) -> None:
    _UNCAUGHT.critical("uncaught exception", exc_info=(kind, value, tb))


def structured_streams(*, stdout: bool = False) -> None:
    """Make every line a serving process writes to stderr one JSON object (see `JsonLines`).

    With `stdout`, text printed to `sys.stdout` goes the same way: on stdio the MCP SDK serves the
    protocol from its own duplicate of fd 1 and points fd 1 at stderr, so a stray print would
    otherwise reach stderr raw. The replacement keeps the real `buffer`, which is what the SDK
    claims. Writes below Python (native code writing to fd 2 itself) are not covered.
    """
    stderr = sys.stderr if isinstance(sys.stderr, JsonLines) else JsonLines(sys.stderr)
    sys.stderr = cast(TextIO, stderr)
    if stdout and not isinstance(sys.stdout, JsonLines):
        sys.stdout = cast(TextIO, JsonLines(stderr.target, source="stdout", buffer=sys.stdout.buffer))
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_process_exception
    structure_console_handlers()


def setup(level: str = "INFO") -> None:
    """Send every logger to stderr as JSON at `level`; replaces handlers others installed."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Third-party chatter at INFO is noise in an agent's inner loop (qiskit-ibm-runtime logs every
    # API request at INFO).
    for noisy in (
        "httpx",
        "httpx2",
        "uvicorn.access",
        "qiskit",
        "qiskit_ibm_runtime",
        "stevedore",
        "mcp.server.streamable_http",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
