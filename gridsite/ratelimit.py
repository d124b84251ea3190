"""Fixed-window request counters in Redis, shared by every gateway process.

A client may send ``limit`` requests in each window of ``window`` seconds; the
window starts on a multiple of ``window`` since the epoch. Each check costs one
round trip: a pipeline of INCR and EXPIRE on the window's key. A fixed window
lets a client send up to twice the limit across a window boundary, which is
acceptable for protecting the gateway and keeps the check to one key.

When Redis cannot be reached the request is allowed and a warning is logged,
so an outage of the counters never turns into an outage of the API.
"""

from __future__ import annotations

import logging
import math
import time

import redis

from gridsite import redis as grid_redis

logger = logging.getLogger(__name__)

Rate = tuple[int, int]

# Seconds between two warnings about Redis failing, so an outage logs a few
# lines with a count instead of one line per request.
WARN_EVERY = 60.0
_skipped = {"count": 0, "last_warning": -math.inf}


def _window(scope: str, ident: str, rate: Rate, now: float) -> tuple[str, float]:
    """Return the counter key of the current window and the seconds left in it."""
    _, window = rate
    start = int(now // window) * window
    key = grid_redis.key("rate", scope, ident, start)
    return key, start + window - now


def retry_after(seconds: float) -> int:
    """Round a wait up to whole seconds for the Retry-After header, at least 1."""
    return max(1, math.ceil(seconds))


def hit(scope: str, ident: str, rate: Rate) -> float | None:
    """Count one request; return None when allowed, else the seconds to wait.

    ``scope`` separates counters of different limits (such as ``api`` and
    ``infer``) and ``ident`` names the client, such as ``token:12``.
    """
    limit, window = rate
    key, left = _window(scope, ident, rate, time.time())
    try:
        pipe = grid_redis.sync_client().pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, window + 1)
        count, _ = pipe.execute()
    except redis.RedisError as exc:
        _warn_unchecked(scope, ident, exc)
        return None
    if count > limit:
        return left
    return None


def _warn_unchecked(scope: str, ident: str, exc: redis.RedisError) -> None:
    _skipped["count"] += 1
    now = time.monotonic()
    if now - _skipped["last_warning"] < WARN_EVERY:
        return
    logger.warning(
        "rate limit %s for %s not checked, Redis failed: %s (%d requests unchecked since the last warning)",
        scope,
        ident,
        exc,
        _skipped["count"],
    )
    _skipped["count"] = 0
    _skipped["last_warning"] = now


def describe(rate: Rate) -> str:
    """Describe a rate for messages, such as ``600 requests per 60 s``."""
    limit, window = rate
    return f"{limit} requests per {window} s"
