"""Return a 503 that names the service when PostgreSQL or Redis is unreachable.

Without this middleware a request that reaches a view while either server is
down ends in a 500 that reports only that the gateway failed. A 503 with
Retry-After and the code ``database_unavailable`` or ``redis_unavailable``
tells a client to retry and an operator where to look. Nothing here retries
the request, because the psycopg pool and the Redis clients reconnect on their
own once the server is back.

After a database error the idle connections of the psycopg pool are
tested and the dead ones dropped. PostgreSQL kills every connection when it
restarts, and the pool lends a dead one without testing it, so without this
each pooled connection would fail one more request after the server is back.
(Django's CONN_HEALTH_CHECKS tests each connection before lending it instead,
but psycopg_pool 3.3 sleeps 1, 2, 4... seconds between failed tests, so a
full pool of dead connections outlasts the pool's 10 s timeout.)

Only errors raised by a view reach ``process_exception``, for the async
inference view too. An error raised by another middleware, such as the
session middleware, still ends in a 500.
"""

from __future__ import annotations

import logging
import threading
import time

import redis.exceptions
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections
from django.http import HttpRequest, HttpResponse

from gridsite.errors import ApiError, is_api

logger = logging.getLogger(__name__)

# Seconds a client should wait before it retries.
RETRY_AFTER = 5
# Seconds between log lines about one service, so an outage under load does
# not write one line per request.
LOG_INTERVAL = 10.0

_OUTAGES: dict[str, tuple[str, str]] = {
    "database": ("database_unavailable", "PostgreSQL"),
    "redis": ("redis_unavailable", "Redis"),
}


def _service(exception: Exception) -> str | None:
    if isinstance(exception, (OperationalError, InterfaceError)):
        return "database"
    if isinstance(exception, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
        return "redis"
    return None


class _LogLimiter:
    """Log the first error about a service, then at most one line per LOG_INTERVAL."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, service: str, request: HttpRequest, exception: Exception) -> None:
        now = time.monotonic()
        if now - self._last.get(service, float("-inf")) < LOG_INTERVAL:
            self._suppressed[service] = self._suppressed.get(service, 0) + 1
            return
        skipped = self._suppressed.pop(service, 0)
        self._last[service] = now
        logger.warning(
            "%s is unreachable, so %s %s returned 503 (%d more such requests since the last line): %s",
            _OUTAGES[service][1],
            request.method,
            request.path,
            skipped,
            exception,
        )


_limiter = _LogLimiter()

# Seconds between two tests of the pool's idle connections in one process.
PURGE_INTERVAL = 1.0
_last_purge = float("-inf")
_purge_lock = threading.Lock()


def drop_dead_connections() -> None:
    """Test the pool's idle connections and replace the dead ones.

    Costs one empty query per idle connection, at most once per
    PURGE_INTERVAL. Does nothing when GRID_DB_POOL is off.
    """
    global _last_purge
    with _purge_lock:
        now = time.monotonic()
        if now - _last_purge < PURGE_INTERVAL:
            return
        _last_purge = now
    pool = connections[DEFAULT_DB_ALIAS].pool
    if pool is None:
        return
    try:
        pool.check()
    except Exception:
        logger.exception("testing the idle database connections failed")


def outage_response(request: HttpRequest, service: str) -> HttpResponse:
    """Build the 503 for ``service`` ("database" or "redis")."""
    code, name = _OUTAGES[service]
    message = f"{name} is unreachable, so the gateway cannot handle {request.path} now; retry in {RETRY_AFTER} s"
    headers = {"Retry-After": str(RETRY_AFTER)}
    if is_api(request):
        return ApiError(503, code, message, headers=headers).response()
    response = HttpResponse(message, status=503, content_type="text/plain")
    response["Retry-After"] = str(RETRY_AFTER)
    return response


class ServiceOutage:
    """Turn PostgreSQL and Redis connection errors raised by a view into a 503."""

    # Both modes, so the async inference view gets no thread hop from this.
    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):
        if self.is_async:
            return self._acall(request)
        return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        return await self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        service = _service(exception)
        if service is None:
            return None
        _limiter.log(service, request, exception)
        if service == "database":
            drop_dead_connections()
        return outage_response(request, service)
