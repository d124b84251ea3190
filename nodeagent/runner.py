"""Run inference requests in a thread pool, off the event loop.

torch releases the GIL inside its kernels, so up to ``concurrency`` requests
compute in parallel while the event loop keeps reading messages and sending
heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import safetensors.torch
import torch

from nodeagent.models import LoadedModel

logger = logging.getLogger(__name__)

ErrorKind = Literal["model", "node"]
T = TypeVar("T")

# torch 2.13 reports a failed CPU allocation as a plain RuntimeError with this text.
_CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


class InferenceError(Exception):
    """A request that produced no result.

    ``kind`` is "model" when the same request would fail on every replica, so
    the gateway does not retry it, and "node" when this node could not run it.
    """

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class InferenceResult:
    body: bytes
    elapsed_ms: float


def decode_inputs(model: LoadedModel, body: bytes | memoryview) -> list[torch.Tensor]:
    """Load a safetensors body and return its tensors in the program's input order."""
    try:
        tensors = safetensors.torch.load(bytes(body))
    except Exception as exc:  # SafetensorError and others, from untrusted bytes
        raise InferenceError("model", f"invalid input body: {exc}") from None

    expected = ", ".join(model.input_names)
    missing = [name for name in model.input_names if name not in tensors]
    if missing:
        raise InferenceError(
            "model", f"missing input {missing[0]!r}: the program takes {expected}"
        )
    unexpected = sorted(set(tensors) - set(model.input_names))
    if unexpected:
        raise InferenceError(
            "model", f"unexpected input {unexpected[0]!r}: the program takes {expected}"
        )
    return [tensors[name] for name in model.input_names]


def encode_outputs(outputs: Any) -> bytes:
    """Save a program's outputs as safetensors.

    A single tensor is named ``output``, several ``output_0``, ``output_1``, ...
    """
    if isinstance(outputs, torch.Tensor):
        named = {"output": outputs}
    elif isinstance(outputs, (tuple, list)):
        named = {f"output_{index}": tensor for index, tensor in enumerate(outputs)}
    else:
        raise InferenceError(
            "model",
            f"the program returned {type(outputs).__name__}, but Grid serves only "
            "programs that return a tensor or a tuple of tensors",
        )

    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise InferenceError(
                "model",
                f"{name} is {type(tensor).__name__}, but Grid serves only programs "
                "that return tensors",
            )
        tensor = tensor.detach().cpu().contiguous()
        # safetensors rejects outputs that share memory, such as a tensor
        # returned twice, so later ones get their own copy.
        if tensor.numel():
            storage = tensor.untyped_storage().data_ptr()
            if storage in storages:
                tensor = tensor.clone()
                storage = tensor.untyped_storage().data_ptr()
            storages.add(storage)
        prepared[name] = tensor
    return safetensors.torch.save(prepared)


def call_program(model: LoadedModel, inputs: Sequence[torch.Tensor]) -> Any:
    """Call a loaded program, raising InferenceError with the kind of any failure."""
    try:
        with torch.inference_mode():
            return model.module(*inputs)
    except (MemoryError, torch.OutOfMemoryError) as exc:
        raise InferenceError("node", f"out of memory: {exc}") from None
    except Exception as exc:
        if _CPU_OUT_OF_MEMORY in str(exc):
            raise InferenceError("node", f"out of memory: {exc}") from None
        raise InferenceError("model", f"{type(exc).__name__}: {exc}") from None


def run_inference(
    model: LoadedModel,
    body: bytes | memoryview,
    *,
    delay_ms: int = 0,
    deadline: float | None = None,
) -> InferenceResult:
    """Decode the inputs, call the program and encode its outputs.

    ``deadline`` is a ``time.monotonic()`` value. A request still queued at its
    deadline is rejected as a node error instead of started, because its
    timeout has passed.
    ``delay_ms`` is the GRID_AGENT_DELAY_MS test knob. The sleep counts in
    ``elapsed_ms`` so that a delayed node looks like a slow one.
    """
    if deadline is not None and time.monotonic() > deadline:
        raise InferenceError("node", "the request timed out while queued on the node")

    started = time.perf_counter()
    if delay_ms:
        time.sleep(delay_ms / 1000)
    inputs = decode_inputs(model, body)
    outputs = call_program(model, inputs)
    encoded = encode_outputs(outputs)
    elapsed_ms = (time.perf_counter() - started) * 1000
    return InferenceResult(body=encoded, elapsed_ms=round(elapsed_ms, 3))


class Runner:
    """A thread pool with ``concurrency`` workers that runs inference requests."""

    def __init__(self, *, concurrency: int, delay_ms: int = 0) -> None:
        self.delay_ms = delay_ms
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="grid-infer"
        )

    async def run(
        self, model: LoadedModel, body: bytes | memoryview, *, deadline: float | None
    ) -> InferenceResult:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor,
            lambda: run_inference(
                model, body, delay_ms=self.delay_ms, deadline=deadline
            ),
        )

    async def submit(self, function: Callable[[], T]) -> T:
        """Run ``function`` on one of the pool's workers, queued with inference requests."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    def shutdown(self) -> None:
        """Drop queued requests without waiting for running ones.

        NOTE: Python joins the worker threads at exit, so a request that is
        still computing delays the end of the process until it finishes.
        """
        self._executor.shutdown(wait=False, cancel_futures=True)
