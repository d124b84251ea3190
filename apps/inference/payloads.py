"""Inference inputs and outputs, kept in Redis only as long as a job needs them.

The gateway never writes tensors to PostgreSQL or disk. Inputs stay until the
job's deadline so that failover can resend them; outputs stay for RESULT_TTL
seconds or until the waiting request has read them.
"""

from __future__ import annotations

from django.conf import settings

from gridsite.redis import async_client, key


def _input_key(job_id: str) -> str:
    return key("job", job_id, "in")


def _output_key(job_id: str) -> str:
    return key("job", job_id, "out")


async def store_input(job_id: str, body: bytes, ttl: float) -> None:
    await async_client().set(_input_key(job_id), body, px=int(ttl * 1000) + 5000)


async def load_input(job_id: str) -> bytes | None:
    return await async_client().get(_input_key(job_id))


async def store_output(job_id: str, body: bytes, ttl: int | None = None) -> None:
    await async_client().set(_output_key(job_id), body, ex=ttl or settings.GRID["RESULT_TTL"])


async def take_output(job_id: str) -> bytes | None:
    """Read an output and shorten its life: the client has it now.

    It stays DELIVERED_RESULT_TTL seconds more for a retry with the same
    Idempotency-Key. The input is deleted at once.
    """
    client = async_client()
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(_output_key(job_id))
        pipe.expire(_output_key(job_id), settings.GRID["DELIVERED_RESULT_TTL"])
        pipe.delete(_input_key(job_id))
        output, _, _ = await pipe.execute()
    return output


async def read_output(job_id: str) -> bytes | None:
    return await async_client().get(_output_key(job_id))


async def drop_input(job_id: str) -> None:
    await async_client().delete(_input_key(job_id))
