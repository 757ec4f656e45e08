"""pigeon's logs: stdlib ``logging`` under the ``pigeon.*`` loggers.

Lifecycle events (connected, consumer started/draining/stopped, server
started/draining/stopped, closed, link up/down) are logged at DEBUG, one
line each; handler errors, dead letters, hook errors and refusals at
WARNING. Nothing is formatted unless its level is enabled.

:func:`configure` sets up the ``pigeon`` logger for a program that has no
logging of its own (``pigeon node`` and ``pigeon run`` call it for
``--log-level`` and ``--log-format``)::

    pigeon.logs.configure(level="DEBUG", fmt="json")

A JSON line is one object: ``ts`` (seconds since the epoch), ``level``,
``logger``, ``message``, ``exc`` when there is a traceback, and the fields
passed as ``extra=``.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["JsonFormatter", "configure"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from extra=.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(
    level: str | int = "INFO", fmt: str = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Log ``pigeon.*`` records at ``level`` and above to ``stream``
    (stderr) as ``fmt`` ("text" or "json"). Calling it again replaces the
    handler it added before. Returns that handler.

    Raises:
        ValueError: an unknown level or format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if isinstance(level, str):
        number = logging.getLevelName(level.upper())
        if not isinstance(number, int):
            raise ValueError(f"unknown log level {level!r}")
        level = number
    logger = logging.getLogger("pigeon")
    for old in [h for h in logger.handlers if getattr(h, "_pigeon_configured", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler._pigeon_configured = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per event, not one more per root handler
    return handler
