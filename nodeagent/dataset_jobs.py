"""Run a held model over a held dataset on ``infer.dataset``.

The rows are read from the node's own safetensors file in chunks, on the
runner's worker threads. Only the model's predictions leave the node: an
``infer.result`` with the argmax class of each row, or with the raw outputs
when the dataset's manifest allows them. With ``aggregate``, an
``infer.summary`` carries class counts and, for a dataset with a label tensor,
the accuracy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from gridproto.datasets import InputMatchError, match_inputs
from gridproto.frames import encode_frame
from gridproto.tensors import ITEM_SIZES
from nodeagent.config import DEFAULT_WS_MAX_BYTES
from nodeagent.datasets import Dataset, DatasetCatalog
from nodeagent.models import LoadedModel, ModelStore
from nodeagent.runner import (
    ErrorKind,
    InferenceError,
    Runner,
    call_program,
    encode_outputs,
)

logger = logging.getLogger(__name__)

SendJson = Callable[[dict[str, Any]], Awaitable[None]]
SendFrame = Callable[[bytes, str], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]

# Input bytes per model call; a dataset of any size runs in chunks of this much.
CHUNK_BYTES = 8 * 1024 * 1024
OUTPUTS = ("argmax", "raw")


def _argmax(outputs: Any, rows: int) -> torch.Tensor:
    """Return the argmax class of each row of the program's first output."""
    first = outputs if isinstance(outputs, torch.Tensor) else None
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        first = outputs[0]
    if first is None or first.dim() != 2 or first.shape[0] != rows:
        shape = list(first.shape) if first is not None else type(outputs).__name__
        raise InferenceError(
            "model",
            f"argmax predictions need a first output of shape (rows, classes), got "
            f"{shape} for {rows} rows; ask for raw outputs instead",
        )
    return first.argmax(dim=1)


def _named_outputs(outputs: Any) -> dict[str, torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return {"output": outputs}
    if isinstance(outputs, (tuple, list)):
        return {f"output_{index}": tensor for index, tensor in enumerate(outputs)}
    raise InferenceError("model", f"the program returned {type(outputs).__name__}, not tensors")


class _Chunks:
    """Reads a dataset's rows chunk by chunk from its memory-mapped file."""

    def __init__(self, file: Any, model: LoadedModel, dataset: Dataset, chunk_bytes: int) -> None:
        names = set(file.keys())
        try:
            self.mapping = match_inputs(model.input_names, names, dataset.label_tensor)
        except InputMatchError as exc:
            raise InferenceError("model", str(exc)) from None
        self.file = file
        self.input_names = model.input_names
        slices = {name: file.get_slice(name) for name in self.mapping.values()}
        shapes = {name: piece.get_shape() for name, piece in slices.items()}
        counts = {shape[0] if shape else None for shape in shapes.values()}
        if len(counts) != 1 or None in counts:
            raise InferenceError("node", f"dataset {dataset.name!r} changed on disk since its scan; rescan and retry")
        self.rows = counts.pop()
        # A slice reports its dtype with safetensors' codes, such as "F32".
        row_bytes = sum(
            math.prod(shape[1:]) * ITEM_SIZES.get(slices[name].get_dtype(), 8)
            for name, shape in shapes.items()
        )
        self.chunk_rows = max(1, chunk_bytes // max(1, row_bytes))
        self.labels = file.get_slice(dataset.label_tensor) if dataset.label_tensor in names else None

    def inputs(self, start: int, stop: int) -> list[torch.Tensor]:
        return [self.file.get_slice(self.mapping[name])[start:stop] for name in self.input_names]


def run_over_dataset(
    model: LoadedModel,
    dataset: Dataset,
    *,
    aggregate: bool,
    outputs: str,
    deadline: float | None,
    chunk_bytes: int = CHUNK_BYTES,
) -> bytes | dict[str, Any]:
    """Run ``model`` over every row of ``dataset`` and return what may leave the node.

    Returns a summary dict with ``aggregate``, the raw outputs as safetensors
    bytes with ``outputs="raw"``, and else safetensors bytes with one int64
    ``predictions`` tensor. Blocks, so it runs on a worker thread. Raises
    InferenceError; a run past ``deadline`` (a ``time.monotonic()`` value)
    stops between chunks as a node error.
    """
    with safe_open(str(dataset.path), framework="pt") as file:
        chunks = _Chunks(file, model, dataset, chunk_bytes)
        predictions: list[torch.Tensor] = []
        raw: dict[str, list[torch.Tensor]] = {}
        counts = torch.zeros(0, dtype=torch.int64)
        correct = 0
        for start in range(0, chunks.rows, chunks.chunk_rows):
            if deadline is not None and time.monotonic() > deadline:
                raise InferenceError("node", f"the job timed out after {start} of {chunks.rows} rows")
            stop = min(start + chunks.chunk_rows, chunks.rows)
            result = call_program(model, chunks.inputs(start, stop))
            if outputs == "raw":
                for name, tensor in _named_outputs(result).items():
                    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0 or tensor.shape[0] != stop - start:
                        raise InferenceError("model", f"{name} does not have one row per input row, so it cannot be joined over chunks")
                    raw.setdefault(name, []).append(tensor.detach().cpu())
                continue
            classes = _argmax(result, stop - start)
            if not aggregate:
                predictions.append(classes.to(torch.int64))
                continue
            chunk_counts = torch.bincount(classes)
            size = max(len(counts), len(chunk_counts))
            counts = torch.nn.functional.pad(counts, (0, size - len(counts))) + torch.nn.functional.pad(
                chunk_counts, (0, size - len(chunk_counts))
            )
            if chunks.labels is not None:
                correct += int((classes == chunks.labels[start:stop].to(torch.int64)).sum())

    if outputs == "raw":
        joined = tuple(torch.cat(parts) for parts in raw.values())
        return encode_outputs(joined[0] if len(joined) == 1 else joined)
    if not aggregate:
        joined = torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.int64)
        return safetensors.torch.save({"predictions": joined.contiguous()})
    summary: dict[str, Any] = {
        "rows": chunks.rows,
        "class_counts": {str(index): int(count) for index, count in enumerate(counts.tolist()) if count},
    }
    if chunks.labels is not None:
        summary.update(
            label_tensor=dataset.label_tensor,
            correct=correct,
            accuracy=correct / chunks.rows if chunks.rows else None,
        )
    return summary


class DatasetJobHandler:
    """Starts ``infer.dataset`` jobs on the runner and sends each result or error.

    ``in_flight`` counts the jobs accepted and not yet finished, for the heartbeat.
    """

    def __init__(
        self,
        store: ModelStore,
        catalog: DatasetCatalog,
        runner: Runner,
        *,
        send_json: SendJson,
        send_frame: SendFrame,
        spawn: Spawn,
    ) -> None:
        self.store = store
        self.catalog = catalog
        self.runner = runner
        self.in_flight = 0
        # The gateway's frame limit, from welcome.
        self.max_frame_bytes = DEFAULT_WS_MAX_BYTES
        self._send_json = send_json
        self._send_frame = send_frame
        self._spawn = spawn

    async def request(self, message: dict[str, Any]) -> None:
        job_id, attempt = message["job_id"], message["attempt"]
        name, sha256 = message["dataset"], message["sha256"]
        aggregate, outputs = message.get("aggregate", False), message.get("outputs", "argmax")

        if not isinstance(aggregate, bool) or outputs not in OUTPUTS:
            await self._send_error(job_id, attempt, "model", f"aggregate must be a boolean and outputs one of {', '.join(OUTPUTS)}")
            return
        if aggregate and outputs == "raw":
            await self._send_error(job_id, attempt, "model", "ask for either a summary (aggregate) or raw outputs, not both")
            return

        model = self.store.get(sha256)
        if model is None:
            await self._send_error(job_id, attempt, "node", f"model {sha256} is not loaded on this node")
            return
        dataset = self.catalog.get(name)
        if dataset is None:
            await self._send_error(job_id, attempt, "node", f"dataset {name!r} is not on this node; it may have been removed since the last scan")
            return
        if outputs == "raw" and not dataset.allow_raw_outputs:
            await self._send_error(
                job_id,
                attempt,
                "model",
                f"dataset {name!r} does not allow raw outputs, because a model's outputs can copy its rows; "
                'ask for argmax predictions or a summary, or have the node owner set "allow_raw_outputs": true in its manifest',
            )
            return

        timeout = message["timeout"]
        deadline = time.monotonic() + timeout if timeout > 0 else None
        self.in_flight += 1
        logger.info("job %s attempt %d: running model %s over dataset %s (%d rows)", job_id, attempt, sha256, name, dataset.rows)
        self._spawn(self._run(job_id, attempt, model, dataset, aggregate, outputs, deadline))

    async def _run(
        self,
        job_id: str,
        attempt: int,
        model: LoadedModel,
        dataset: Dataset,
        aggregate: bool,
        outputs: str,
        deadline: float | None,
    ) -> None:
        started = time.perf_counter()
        try:
            result = await self.runner.submit(
                lambda: run_over_dataset(model, dataset, aggregate=aggregate, outputs=outputs, deadline=deadline)
            )
        except InferenceError as exc:
            await self._send_error(job_id, attempt, exc.kind, str(exc))
            return
        except Exception as exc:
            # A bug or an unreadable file must still produce a reply, or the
            # gateway waits until the job times out.
            logger.exception("job %s attempt %d over dataset %s: internal error", job_id, attempt, dataset.name)
            await self._send_error(job_id, attempt, "node", f"internal error in the node agent: {type(exc).__name__}: {exc}")
            return
        finally:
            self.in_flight -= 1

        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        logger.info("job %s attempt %d over dataset %s: done in %.1f ms", job_id, attempt, dataset.name, elapsed_ms)
        if isinstance(result, dict):
            await self._send_json(
                {"type": "infer.summary", "job_id": job_id, "attempt": attempt, "elapsed_ms": elapsed_ms, "summary": result}
            )
            return
        header = {"type": "infer.result", "job_id": job_id, "attempt": attempt, "elapsed_ms": elapsed_ms}
        frame = encode_frame(header, result)
        if len(frame) > self.max_frame_bytes:
            await self._send_error(
                job_id,
                attempt,
                "model",
                f"the predictions are {len(frame)} bytes, over the gateway's frame limit of "
                f"{self.max_frame_bytes} bytes; ask for a summary or argmax predictions",
            )
            return
        await self._send_frame(frame, f"infer.result for job {job_id} attempt {attempt}")

    async def _send_error(self, job_id: str, attempt: int, kind: ErrorKind, error: str) -> None:
        logger.warning("job %s attempt %d: %s error: %s", job_id, attempt, kind, error)
        await self._send_json({"type": "infer.error", "job_id": job_id, "attempt": attempt, "kind": kind, "error": error})
