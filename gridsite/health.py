"""Readiness: GET /readyz checks that this process reaches what it needs to serve.

``/healthz`` only reports that the process is up. ``/readyz`` also checks PostgreSQL,
Redis (the Channels layer, heartbeats and payloads) and the Celery broker,
each with its own short timeout, at the same time. A load balancer should send
traffic only to processes whose /readyz returns 200.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg
import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from kombu import Connection

logger = logging.getLogger(__name__)

# Seconds each check may take; the checks run in parallel.
CHECK_TIMEOUT = 2.0


def check_postgres() -> None:
    # A connection of its own rather than the pool's: the pool waits up to its
    # own timeout (10 s) for a connection before it reports anything.
    params = {k: v for k, v in connection.get_connection_params().items() if k not in {"cursor_factory", "context"}}
    with psycopg.connect(**params, connect_timeout=max(1, int(CHECK_TIMEOUT))) as conn:
        conn.execute("SELECT 1")


def check_redis() -> None:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=CHECK_TIMEOUT, socket_timeout=CHECK_TIMEOUT)
    try:
        client.ping()
    finally:
        client.close()


def check_broker() -> None:
    with Connection(settings.CELERY_BROKER_URL, connect_timeout=CHECK_TIMEOUT, transport_options={"socket_timeout": CHECK_TIMEOUT}) as conn:
        conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT)


CHECKS = {"postgres": check_postgres, "redis": check_redis, "broker": check_broker}


async def _run(name: str) -> tuple[str, str | None, float]:
    started = time.monotonic()
    try:
        await asyncio.wait_for(asyncio.to_thread(CHECKS[name]), timeout=CHECK_TIMEOUT + 1)
        error = None
    except TimeoutError:
        error = f"no answer within {CHECK_TIMEOUT + 1:.0f} s"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".strip()[:300]
    return name, error, time.monotonic() - started


async def readyz(request: HttpRequest) -> JsonResponse:
    """Return 200 when every check passes, else 503 naming the first that failed.

    The body lists every check: {"status": ..., "checks": {"postgres":
    {"ok": true, "ms": 1.2}, ...}}, and on 503 also the standard error object
    with the failed service in ``field``.
    """
    results = await asyncio.gather(*(_run(name) for name in CHECKS))
    checks = {name: {"ok": error is None, "ms": round(seconds * 1000, 1), **({"error": error} if error else {})} for name, error, seconds in results}
    failed = [(name, error) for name, error, _ in results if error is not None]
    if not failed:
        return JsonResponse({"status": "ready", "checks": checks})
    for name, error in failed:
        logger.warning("readiness check %s failed: %s", name, error)
    name, error = failed[0]
    message = f"{name} is unreachable: {error}"
    body = {"status": "unavailable", "checks": checks, "error": {"code": "not_ready", "message": message, "field": name}}
    return JsonResponse(body, status=503)
