"""Idempotency-Key: a retried POST with the same key gets the same job.

Keys are scoped to the user and kept IDEMPOTENCY_TTL seconds in Redis. The
first request claims the key with SET NX, so two concurrent retries cannot
both create a job.
"""

from __future__ import annotations

import re

from django.conf import settings

from gridsite.errors import ApiError
from gridsite.redis import async_client, key

KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,200}$")


def parse_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not KEY.match(raw):
        raise ApiError(400, "invalid_input", "Idempotency-Key must be 1-200 letters, digits, '_', '.', ':' or '-'; a UUID works", "Idempotency-Key")
    return raw


async def claim(user_id: int, idempotency_key: str, job_id: str) -> str | None:
    """Bind the key to ``job_id``; return the job it was already bound to, if any."""
    client = async_client()
    name = key("idem", user_id, idempotency_key)
    if await client.set(name, job_id, nx=True, ex=settings.GRID["IDEMPOTENCY_TTL"]):
        return None
    existing = await client.get(name)
    return existing.decode() if existing else None


async def release(user_id: int, idempotency_key: str) -> None:
    """Forget a key whose request created no job, so a retry can try again."""
    await async_client().delete(key("idem", user_id, idempotency_key))
