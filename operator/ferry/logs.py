"""One logging setup for every ferry program (the CLI, the operator, the agent, the metadata
endpoint, the sim VM process).

``FERRY_LOG_FORMAT`` picks the line format: ``text`` (default, ``FORMAT``) or ``json`` (one
JSON object per line for log pipelines: ``time``, ``level``, ``logger``, ``message``, the
fields a call passed with ``extra=`` such as ``migration`` and ``phase``, and ``exception``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def log_format(environ: dict[str, str] | None = None) -> str:
    """``FERRY_LOG_FORMAT`` (text or json); anything else is an error."""
    value = ((os.environ if environ is None else environ).get("FERRY_LOG_FORMAT") or "text").strip().lower()
    if value not in FORMATS:
        raise ValueError(f"FERRY_LOG_FORMAT must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT)


def configure(level: int = logging.WARNING, fmt: str | None = None) -> None:
    """The root logger writes lines in ``fmt`` (default: ``FERRY_LOG_FORMAT``) to stderr at ``level``."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format=FORMAT)
    if fmt is None:
        try:
            fmt = log_format()
        except ValueError:
            fmt = "text"  # Settings.validate() names the mistake; the log still works
    for handler in root.handlers:
        handler.setFormatter(formatter(fmt))
    root.setLevel(max(level, logging.DEBUG))


def for_server() -> None:
    """A long-running program says where it listens, when it is ready and what it does at
    INFO, even when the CLI's default level is WARNING (``-v`` still lowers it to DEBUG)."""
    configure(logging.getLogger().level or logging.WARNING)
    ferry = logging.getLogger("ferry")
    ferry.setLevel(min(ferry.getEffectiveLevel(), logging.INFO))
