"""Log lines for people (text) or machines (JSON, one object per line, stable fields)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("tunnel")

# Present in every JSON line (null where they do not apply), so consumers can rely on them.
FIELDS = ("tunnel", "peer", "identity", "bytes_in", "bytes_out", "duration", "reason")


def event(level: int, name: str, message: str, *args: object, **fields: Any) -> None:
    """Log one event: `message % args` for people, `name` and `fields` for machines."""
    if log.isEnabledFor(level):
        log.log(level, message, *args, extra={"event": name, "fields": fields})


class JSONFormatter(logging.Formatter):
    """{"time", "level", "event", FIELDS..., "message"} and any further fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = getattr(record, "fields", {})
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "message"),
        }
        for key in FIELDS:
            doc[key] = fields.get(key)
        for key, value in fields.items():
            if key not in doc:
                doc[key] = value
        doc["message"] = record.getMessage()
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup(log_format: str = "text") -> None:
    """Send the daemon's log to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    # The logging HOWTO's "Optimization" switches: no caller lookup (a walk up the stack),
    # thread, process or multiprocessing names per record; the lines never show them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
