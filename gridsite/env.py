"""Typed readers for settings taken from environment variables.

Each reader fails loudly with the variable's name when a value cannot be
parsed, and ``NAME_FILE`` may point to a file holding the value (for secrets
mounted by an orchestrator).
"""

from __future__ import annotations

import os
from pathlib import Path


class ImproperlyConfiguredEnv(ValueError):
    pass


def env_str(name: str, default: str) -> str:
    path = os.environ.get(f"{name}_FILE")
    if path:
        return Path(path).read_text().strip()
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name, "1" if default else "0").strip().lower()
    if raw in {"1", "true", "yes", "on"}:
        return True
    if raw in {"0", "false", "no", "off", ""}:
        return False
    raise ImproperlyConfiguredEnv(f"{name}={raw!r} is not a boolean; use 1/0, true/false, yes/no or on/off")


def env_float(name: str, default: float) -> float:
    raw = env_str(name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfiguredEnv(f"{name}={raw!r} is not a number") from None


def env_int(name: str, default: int) -> int:
    raw = env_str(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfiguredEnv(f"{name}={raw!r} is not an integer") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


_RATE_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


def env_rate(name: str, default: str) -> tuple[int, int] | None:
    """Read a rate such as ``600/min`` as (requests, window seconds).

    Units are s, min, h and day (also their long and one-letter forms). An
    empty value, ``0`` or ``off`` turns the limit off and returns None.
    """
    raw = env_str(name, default).strip().lower()
    if raw in {"", "0", "off", "none"}:
        return None
    count, _, unit = raw.partition("/")
    seconds = _RATE_UNITS.get(unit.strip())
    if not count.strip().isdigit() or int(count) < 1 or seconds is None:
        raise ImproperlyConfiguredEnv(
            f"{name}={raw!r} is not a rate; write requests per window such as 600/min, 20/s, 10000/h or 0 to turn it off"
        )
    return int(count), seconds
