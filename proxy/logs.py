"""How every tlsedge process logs: text or JSON lines on stderr, one line per event.

Owns the log set-up (`setup`), the two line formats, and the redaction both apply:
a private key (a PEM `PRIVATE KEY` block) or a registered secret (the admin token)
never reaches a log line, whatever a message or a traceback carries.

JSON lines carry `ts` (UTC, ISO 8601), `level`, `logger`, `event` (the message),
`pid`, the fields the call passed with `extra=` (domain, app, issuer, reason, ...)
and `exc` (the traceback) when there is one. Python warnings and uncaught exceptions
go through the same handler, so a JSON log has nothing but JSON lines.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import threading
from types import TracebackType
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error"]

_TEXT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END \1PRIVATE KEY-----|\Z)", re.S)
_REDACTED_KEY = "[private key redacted]"
_REDACTED = "[redacted]"
# What a LogRecord carries of its own; anything else on it came in through `extra=`.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}

_secrets: set[str] = set()
_configured = False


def add_secret(value: str) -> None:
    """Never write `value` (e.g. the admin token) in a log line from now on."""
    if len(value) >= 8:  # a short value would blank out ordinary words
        _secrets.add(value)


def add_secret_file(path: str) -> None:
    """add_secret the first line of `path` (the admin token file), if it is readable."""
    try:
        with open(path, encoding="utf-8") as f:
            add_secret(f.read(4096).strip())
    except (OSError, UnicodeDecodeError):
        pass


def redact(text: str) -> str:
    """`text` without private keys and registered secrets."""
    if "PRIVATE KEY-----" in text:
        text = _PRIVATE_KEY.sub(_REDACTED_KEY, text)
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, _REDACTED)
    return text


class TextFormatter(logging.Formatter):
    """The classic one-line text format, redacted."""

    def __init__(self) -> None:
        super().__init__(_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for its keys)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = _field(value)
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = redact(record.exc_text)
        if record.stack_info:
            line["stack"] = redact(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _field(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def setup(fmt: LogFormat = "text", level: LogLevel | str = "info") -> None:
    """Send every log record of this process to stderr in `fmt`, from `level` up.

    Called once per process (supervisor, worker, one-shot command); calling it again
    replaces the handler.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logging.captureWarnings(True)
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    global _configured
    _configured = True


def is_setup() -> bool:
    """Whether this process logs through `setup` (then errors go to the log)."""
    return _configured


def _uncaught(kind: type[BaseException], exc: BaseException,
              tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("tlsedge").critical("uncaught exception: %s: %s", kind.__name__,
                                          exc, exc_info=(kind, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("tlsedge").critical(
        "uncaught exception in thread %s: %s: %s",
        args.thread.name if args.thread else "?", args.exc_type.__name__, args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
