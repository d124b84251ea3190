"""Dynamic batching: run concurrent requests for one model as one forward pass.

Requests for the same model whose inputs have the same names, dtypes and
shapes apart from dim 0 wait up to ``window_ms`` for each other. The group is
then concatenated along dim 0, run once on the runner's thread pool and split
back by each request's row count. A group also runs as soon as it contains
``max_rows`` rows.

Batching assumes that the program treats dim 0 as independent rows, as a
batch dimension is. NOTE: a program whose rows interact (a norm over the
batch, for example) but whose outputs still have one row per input row gives
different results when batched, and nothing here can detect that.

Each request keeps its own outcome. A batched pass that raises is retried one
request at a time, so a bad input fails only its own request. A program whose
outputs do not have one row per input row is never batched again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gridproto.tensors import TensorFormatError, read_tensor_infos
from nodeagent.models import LoadedModel
from nodeagent.runner import (
    InferenceError,
    InferenceResult,
    Runner,
    call_program,
    decode_inputs,
    encode_outputs,
)

logger = logging.getLogger(__name__)

# Inputs that may share a forward pass: the model's hash, then the name, dtype
# and shape apart from dim 0 of each input, in the program's input order.
BatchKey = tuple[str, tuple[tuple[str, str, tuple[int, ...]], ...]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]


class BatchFailed(Exception):
    """A batched forward pass that raised, so each request must run alone."""


class UnsplittableOutputs(Exception):
    """A program whose outputs do not have one row per input row."""


def batch_key(
    model: LoadedModel, body: bytes | memoryview
) -> tuple[BatchKey, int] | None:
    """Return the batch key of a request body and its row count.

    Reads only the safetensors header. Returns None when the request cannot
    share a forward pass: an invalid body, input names other than the
    program's, a scalar input, or inputs whose dim 0 differ. Such a request
    runs alone, which also reports any error with its usual message.
    """
    try:
        infos = read_tensor_infos(body)
    except TensorFormatError:
        return None
    if set(infos) != set(model.input_names):
        return None

    signature = []
    rows: set[int] = set()
    for name in model.input_names:
        info = infos[name]
        if not info.shape:
            return None
        rows.add(info.shape[0])
        signature.append((name, info.dtype, info.shape[1:]))
    if len(rows) != 1:
        return None
    return (model.sha256, tuple(signature)), rows.pop()


def _split(outputs: Any, counts: Sequence[int]) -> list[Any]:
    """Split a program's outputs along dim 0 into one output per request.

    Raises UnsplittableOutputs unless every output is a tensor whose dim 0 is
    the total row count.
    """
    total = sum(counts)
    if isinstance(outputs, torch.Tensor):
        tensors = [outputs]
    elif isinstance(outputs, (tuple, list)):
        tensors = list(outputs)
    else:
        raise UnsplittableOutputs(
            f"the program returned {type(outputs).__name__}, not tensors"
        )
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            raise UnsplittableOutputs(f"output {index} has no dim 0")
        if tensor.shape[0] != total:
            raise UnsplittableOutputs(
                f"output {index} has {tensor.shape[0]} rows for {total} input rows"
            )

    pieces = [torch.split(tensor, list(counts)) for tensor in tensors]
    if isinstance(outputs, torch.Tensor):
        return list(pieces[0])
    return [tuple(piece[i] for piece in pieces) for i in range(len(counts))]


def run_batch(
    model: LoadedModel,
    bodies: Sequence[bytes | memoryview],
    deadlines: Sequence[float | None],
    *,
    delay_ms: int = 0,
) -> list[InferenceResult | InferenceError]:
    """Run several requests for ``model`` as one forward pass.

    Returns one outcome per request, in order: a request past its deadline or
    with an undecodable body gets its own InferenceError, and every other
    request gets a result whose ``elapsed_ms`` is that of the whole pass.
    ``delay_ms`` (GRID_AGENT_DELAY_MS) is slept once per pass.
    Raises BatchFailed when concatenating or calling the program fails, and
    UnsplittableOutputs when the outputs cannot be split back into requests.
    """
    outcomes: list[InferenceResult | InferenceError | None] = [None] * len(bodies)
    now = time.monotonic()
    for index, deadline in enumerate(deadlines):
        if deadline is not None and now > deadline:
            outcomes[index] = InferenceError(
                "node", "the request timed out while queued on the node"
            )

    started = time.perf_counter()
    if delay_ms:
        time.sleep(delay_ms / 1000)

    live: list[int] = []
    decoded: list[list[torch.Tensor]] = []
    for index, body in enumerate(bodies):
        if outcomes[index] is not None:
            continue
        try:
            decoded.append(decode_inputs(model, body))
        except InferenceError as exc:
            outcomes[index] = exc
            continue
        live.append(index)
    if not live:
        return outcomes  # type: ignore[return-value]

    counts = [tensors[0].shape[0] for tensors in decoded]
    try:
        inputs = [
            torch.cat([tensors[slot] for tensors in decoded])
            for slot in range(len(model.input_names))
        ]
    except RuntimeError as exc:
        raise BatchFailed(f"cannot concatenate the inputs: {exc}") from None
    try:
        outputs = call_program(model, inputs)
    except InferenceError as exc:
        raise BatchFailed(f"{exc.kind} error: {exc}") from None

    bodies_out = [encode_outputs(piece) for piece in _split(outputs, counts)]
    elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
    for index, encoded in zip(live, bodies_out):
        outcomes[index] = InferenceResult(body=encoded, elapsed_ms=elapsed_ms)
    return outcomes  # type: ignore[return-value]


@dataclass
class _Request:
    job_id: str
    body: bytes | memoryview
    rows: int
    deadline: float | None
    future: asyncio.Future[InferenceResult]


@dataclass
class _Group:
    model: LoadedModel
    requests: list[_Request] = field(default_factory=list)
    rows: int = 0
    timer: asyncio.TimerHandle | None = None


class Batcher:
    """Groups inference requests into batched forward passes on a Runner.

    ``window_ms`` 0 turns batching off. The event loop owns all state here;
    only ``run_batch`` and the runner's own calls run on worker threads.
    ``batch_sizes`` counts batched passes that succeeded by their number of
    requests, ``fallbacks`` counts batched passes retried one request at a
    time, and ``unbatchable`` contains the hashes of models never batched again.
    """

    def __init__(
        self,
        runner: Runner,
        *,
        window_ms: int,
        max_rows: int,
        spawn: Spawn,
    ) -> None:
        self.runner = runner
        self.window_ms = window_ms
        self.max_rows = max_rows
        self.batch_sizes: Counter[int] = Counter()
        self.fallbacks = 0
        self.unbatchable: set[str] = set()
        self._spawn = spawn
        self._groups: dict[BatchKey, _Group] = {}

    async def run(
        self,
        model: LoadedModel,
        body: bytes | memoryview,
        *,
        deadline: float | None,
        job_id: str,
    ) -> InferenceResult:
        """Run one request, alone or in a batch, and return its own result.

        Raises InferenceError as ``Runner.run`` does.
        """
        planned = None
        if self.window_ms > 0 and model.sha256 not in self.unbatchable:
            planned = batch_key(model, body)
        if planned is None or planned[1] < 1 or planned[1] > self.max_rows:
            return await self.runner.run(model, body, deadline=deadline)

        key, rows = planned
        group = self._groups.get(key)
        if group is not None and group.rows + rows > self.max_rows:
            self._flush(key)
            group = None
        if group is None:
            group = _Group(model=model)
            self._groups[key] = group
            group.timer = asyncio.get_running_loop().call_later(
                self.window_ms / 1000, self._flush, key
            )

        future: asyncio.Future[InferenceResult] = (
            asyncio.get_running_loop().create_future()
        )
        group.requests.append(_Request(job_id, body, rows, deadline, future))
        group.rows += rows
        if group.rows >= self.max_rows:
            self._flush(key)
        return await future

    def _flush(self, key: BatchKey) -> None:
        group = self._groups.pop(key, None)
        if group is None:
            return
        if group.timer is not None:
            group.timer.cancel()
        self._spawn(self._run_group(group))

    async def _run_group(self, group: _Group) -> None:
        requests = group.requests
        try:
            if len(requests) == 1:
                await self._run_alone(group.model, requests[0])
                return
            await self._run_batched(group.model, requests)
        finally:
            # Cancelled while waiting: the requests get no result, so their
            # own tasks must not wait forever.
            for request in requests:
                if not request.future.done():
                    request.future.cancel()

    async def _run_batched(self, model: LoadedModel, requests: list[_Request]) -> None:
        sha256 = model.sha256
        job_ids = ", ".join(request.job_id for request in requests)
        bodies = [request.body for request in requests]
        deadlines = [request.deadline for request in requests]
        try:
            outcomes = await self.runner.submit(
                lambda: run_batch(
                    model, bodies, deadlines, delay_ms=self.runner.delay_ms
                )
            )
        except UnsplittableOutputs as exc:
            self.unbatchable.add(sha256)
            self.fallbacks += 1
            logger.warning(
                "model %s: cannot split a batched pass back into requests (%s), so "
                "its requests run one at a time from now on; rerunning jobs %s alone",
                sha256,
                exc,
                job_ids,
            )
            await self._run_each_alone(model, requests)
            return
        except Exception as exc:  # noqa: BLE001
            # BatchFailed, or any other error: one bad input or a bug must not
            # fail the other requests of the batch.
            self.fallbacks += 1
            logger.warning(
                "model %s: batched pass of %d requests failed (%s); retrying jobs "
                "%s one at a time",
                sha256,
                len(requests),
                exc,
                job_ids,
            )
            await self._run_each_alone(model, requests)
            return

        self.batch_sizes[len(requests)] += 1
        logger.debug(
            "model %s: ran jobs %s in one forward pass of %d rows",
            sha256,
            job_ids,
            sum(request.rows for request in requests),
        )
        for request, outcome in zip(requests, outcomes):
            if request.future.done():
                continue
            if isinstance(outcome, InferenceError):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    async def _run_each_alone(
        self, model: LoadedModel, requests: list[_Request]
    ) -> None:
        await asyncio.gather(*(self._run_alone(model, request) for request in requests))

    async def _run_alone(self, model: LoadedModel, request: _Request) -> None:
        try:
            result = await self.runner.run(
                model, request.body, deadline=request.deadline
            )
        except Exception as exc:  # noqa: BLE001 (raised again by the caller's await)
            if not request.future.done():
                request.future.set_exception(exc)
            return
        if not request.future.done():
            request.future.set_result(result)
