"""Log line formats shared by the gateway and the node agent.

``GRID_LOG_FORMAT=json`` switches both to one JSON object per line, for log
shippers. Tokens that reach a message by mistake are masked in both formats.
Nothing here imports Django, so the agent can use it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
FORMATS = ("plain", "json")

# Grid's API and node tokens are "<prefix>_" and 43 URL-safe base64 characters.
_TOKEN = re.compile(r"\b(grid|node|api)_[A-Za-z0-9_-]{20,}")

# Attributes every LogRecord has; anything else came from ``extra=``.
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """Mask anything shaped like a Grid token, keeping its prefix."""
    return _TOKEN.sub(lambda match: f"{match.group(1)}_[redacted]", text)


class PlainFormatter(logging.Formatter):
    """The default text format, with tokens masked."""

    def __init__(self, fmt: str = PLAIN_FORMAT, **kwargs) -> None:
        super().__init__(fmt, **kwargs)

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": record.process,
        }
        for name, value in vars(record).items():
            if name not in _RESERVED and not name.startswith("_"):
                line[name] = value if isinstance(value, (int, float, bool)) or value is None else redact(str(value))
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False)


def log_format(environ: Mapping[str, str]) -> str:
    """Return the format GRID_LOG_FORMAT selects: ``plain`` (the default) or ``json``.

    Raises ValueError naming the variable for any other value.
    """
    value = environ.get("GRID_LOG_FORMAT", "plain").strip().lower() or "plain"
    if value not in FORMATS:
        raise ValueError(f"GRID_LOG_FORMAT={value!r} is not a log format; use plain or json")
    return value


def formatter_class(environ: Mapping[str, str]) -> type[logging.Formatter]:
    return JsonFormatter if log_format(environ) == "json" else PlainFormatter


def make_formatter(environ: Mapping[str, str], plain_format: str = PLAIN_FORMAT) -> logging.Formatter:
    """Return the formatter GRID_LOG_FORMAT selects, using ``plain_format`` for plain text."""
    if log_format(environ) == "json":
        return JsonFormatter()
    return PlainFormatter(plain_format)
