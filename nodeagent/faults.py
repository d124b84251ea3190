"""Fault injection for tests and benchmarks (GRID_AGENT_FAULT), off by default.

``wrong-outputs`` adds 1.0 to every floating-point output tensor of an
``infer.request``, to simulate a lying or broken node. ``crash-on-infer`` ends
the process with exit status 1 as soon as an ``infer.request`` arrives, to
simulate a crash mid-inference. Never set either on a node that serves users.
"""

from __future__ import annotations

import logging
import os

import safetensors.torch

from nodeagent.config import FAULT_CRASH_ON_INFER, FAULT_WRONG_OUTPUTS

logger = logging.getLogger(__name__)

__all__ = ["FAULT_CRASH_ON_INFER", "FAULT_WRONG_OUTPUTS", "crash", "shift_outputs"]


def shift_outputs(body: bytes) -> bytes:
    """Return a safetensors body with 1.0 added to each floating-point tensor.

    Integer and boolean tensors are returned unchanged.
    """
    tensors = safetensors.torch.load(body)
    shifted = {
        name: tensor + 1.0 if tensor.is_floating_point() else tensor
        for name, tensor in tensors.items()
    }
    return safetensors.torch.save(shifted)


def crash(job_id: object, attempt: object, sha256: object) -> None:
    """End the process at once with exit status 1, as a crash would.

    os._exit skips cleanup, so the connection drops with no ``bye`` and no
    reply to the request.
    """
    logger.error(
        "job %s attempt %s on model %s: GRID_AGENT_FAULT=%s, exiting with status 1",
        job_id,
        attempt,
        sha256,
        FAULT_CRASH_ON_INFER,
    )
    os._exit(1)
