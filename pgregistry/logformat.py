"""Log lines for people or for machines: ``pgregistry node --log-format plain|json`` (layer 1).

The package logs under ``pgregistry.*`` with plain messages; the events an operator
follows (a peer up or down, a connection refused, a registry sync round) also carry
``extra`` fields: ``node`` (the node logging), ``event`` (a short name such as
``"peer_up"``) and ``peer``. `JsonFormatter` writes each record as one JSON object a
line with ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``node``, ``event``, ``peer``
and ``message`` (and ``exception`` when there is one); fields a record lacks are null.
Nothing secret is ever logged: the cookie never reaches a log record.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Final

__all__ = ["FORMATS", "JsonFormatter", "configure"]

FORMATS: Final = ("plain", "json")
PLAIN: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "node": getattr(record, "node", None),
            "event": getattr(record, "event", None),
            "peer": getattr(record, "peer", None),
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, fmt: str) -> None:
    """Send the package's logs at `level` and above to stderr, as `fmt` (`FORMATS`)."""
    if fmt not in FORMATS:
        raise ValueError(f"the log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
