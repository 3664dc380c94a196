"""Log lines for people (text) or machines (JSON, one object per line, stable fields).

Peers choose much of what is logged: addresses, unix socket paths, certificate names,
reasons quoting them. Neither format lets that text break a line: a text line escapes
every character that is not printable (see `escape`), and JSON escapes control and
non-ASCII characters (json.dumps, ensure_ascii). Python warnings (cryptography's about a
certificate name over its length limit, say) are logged as records too, never written to
stderr as lines of their own."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import Any, TextIO

log = logging.getLogger("tunnel")

# Present in every JSON line (null where they do not apply), so consumers can rely on them.
FIELDS = ("tunnel", "peer", "identity", "bytes_in", "bytes_out", "duration", "reason")

_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with a backslash escape for every character str.isprintable() rejects and
    for the backslash itself, so that it stays on one line and shows no terminal control
    sequence: `\\n`, `\\r`, `\\t`, `\\\\`, else `\\xHH` (below U+0100: ESC is `\\x1b`),
    `\\uHHHH` (U+2028 is `\\u2028`) or `\\UHHHHHHHH`, as in a Python string literal.
    Unambiguous: a backslash in the result always starts an escape. The space is kept."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out)


def event(level: int, name: str, message: str, *args: object, **fields: Any) -> None:
    """Log one event: `message % args` for people, `name` and `fields` for machines.
    Arguments need no escaping by the caller: the formatters do it."""
    if log.isEnabledFor(level):
        log.log(level, message, *args, extra={"event": name, "fields": fields})


class TextFormatter(logging.Formatter):
    """`TIME LEVEL MESSAGE`, one line per record: the message with `escape` applied (the
    arguments and the format alike). A traceback follows on lines of its own, each
    indented by two spaces and escaped, so a line that starts unindented always starts
    a record."""

    def __init__(self, process: str | None = None) -> None:
        where = f"{process} " if process else ""
        super().__init__(f"%(asctime)s %(levelname)s {where}%(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return timestamp(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)  # format() sets it afresh for every handler
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(stack_info)


def _indented(text: str) -> str:
    return "\n".join("  " + escape(line) for line in text.rstrip("\n").split("\n"))


def timestamp(record: logging.LogRecord) -> str:
    """When a record was made: UTC, ISO 8601 with milliseconds and the offset
    (2026-11-30T10:58:20.031+00:00), the same in text and JSON lines."""
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JSONFormatter(logging.Formatter):
    """{"time", "level", "event", FIELDS..., "message"} and any further fields; with
    several processes (--workers), "process" says which wrote the line."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc: dict[str, Any] = {
            "time": timestamp(record),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "message"),
        }
        if self.process:
            doc["process"] = self.process
        for key in FIELDS:
            doc[key] = fields.get(key)
        for key, value in fields.items():
            if key not in doc:
                doc[key] = value
        doc["message"] = record.getMessage()
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        # ensure_ascii (the default): control characters, U+2028/U+2029 and the rest of
        # non-ASCII come out as \uXXXX, so one record is always one line.
        return json.dumps(doc, default=str)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """warnings.showwarning for the daemon: one `warning` record (which the filters
    already let through: by default once per message and place)."""
    event(
        logging.WARNING,
        "warning",
        "%s: %s (%s:%d)",
        category.__name__,
        message,
        filename,
        lineno,
        reason=f"{category.__name__}: {message}",
    )


def setup(log_format: str = "text", process: str | None = None) -> None:
    """Send the daemon's log to stderr in the chosen format, Python warnings included.
    `process` ("supervisor", "worker=2") names the process in every line when there are
    several (--workers)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter(process) if log_format == "json" else TextFormatter(process))
    # The logging HOWTO's "Optimization" switches: no caller lookup (a walk up the stack),
    # thread, process or multiprocessing names per record; the lines never show them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # Other libraries' records (warnings and up) in the same format, not logging's bare
    # last-resort lines.
    logging.getLogger().handlers[:] = [handler]
    warnings.showwarning = _log_warning
