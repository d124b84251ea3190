"""Run inference requests and send an ``infer.result`` or ``infer.error`` for each.

Each (job_id, attempt) runs at most once. A repeated delivery is logged and
dropped, so it gets no second run and no second infer.result or infer.error.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from gridproto.frames import encode_frame
from nodeagent import faults
from nodeagent.batching import Batcher
from nodeagent.config import (
    DEFAULT_BATCH_WINDOW_MS,
    DEFAULT_MAX_BATCH_ROWS,
    DEFAULT_WS_MAX_BYTES,
)
from nodeagent.models import LoadedModel, ModelStore
from nodeagent.runner import ErrorKind, InferenceError, Runner

logger = logging.getLogger(__name__)

SendJson = Callable[[dict[str, Any]], Awaitable[None]]
SendFrame = Callable[[bytes, str], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]

# (job_id, attempt) pairs remembered to drop repeated deliveries. The gateway
# numbers each retry as a new attempt, so only a redelivery repeats a pair.
# NOTE: a redelivery that arrives after 10,000 newer requests runs again.
DELIVERY_RECORD_SIZE = 10_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class DeliveryRecord:
    """The last ``capacity`` (job_id, attempt) pairs received, oldest dropped first."""

    def __init__(self, capacity: int = DELIVERY_RECORD_SIZE) -> None:
        self.capacity = capacity
        self._pairs: OrderedDict[tuple[str, int], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pairs)

    def add(self, job_id: str, attempt: int) -> bool:
        """Record a delivery and return False if the pair was already recorded."""
        pair = (job_id, attempt)
        if pair in self._pairs:
            self._pairs.move_to_end(pair)
            return False
        self._pairs[pair] = None
        if len(self._pairs) > self.capacity:
            self._pairs.popitem(last=False)
        return True


class JobHandler:
    """Starts inference requests on the runner and sends each result or error.

    ``in_flight`` counts requests that are accepted and not yet finished,
    queued ones and ones waiting in a batch window included, for the heartbeat.
    ``fault`` is a GRID_AGENT_FAULT value (see nodeagent.faults), or None.
    """

    def __init__(
        self,
        store: ModelStore,
        runner: Runner,
        *,
        send_json: SendJson,
        send_frame: SendFrame,
        spawn: Spawn,
        batch_window_ms: int = DEFAULT_BATCH_WINDOW_MS,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        fault: str | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.batcher = Batcher(
            runner, window_ms=batch_window_ms, max_rows=max_batch_rows, spawn=spawn
        )
        self.deliveries = DeliveryRecord()
        self.fault = fault
        self.in_flight = 0
        # The gateway's frame limit from welcome. The gateway closes the
        # connection with 1009 on a larger frame.
        self.max_frame_bytes = DEFAULT_WS_MAX_BYTES
        self._send_json = send_json
        self._send_frame = send_frame
        self._spawn = spawn

    async def request(self, header: dict[str, Any], body: memoryview) -> None:
        job_id, attempt = header.get("job_id"), header.get("attempt")
        if self.fault == faults.FAULT_CRASH_ON_INFER:
            faults.crash(job_id, attempt, header.get("sha256"))
        if not isinstance(job_id, str) or not _is_int(attempt):
            logger.warning(
                "ignoring an infer.request without a string job_id and an integer "
                "attempt: job_id=%r attempt=%r",
                job_id,
                attempt,
            )
            return

        sha256, timeout = header.get("sha256"), header.get("timeout")
        if not self.deliveries.add(job_id, attempt):
            logger.warning(
                "job %s attempt %d on model %s: ignoring a repeated infer.request, "
                "because this node already received this attempt",
                job_id,
                attempt,
                sha256,
            )
            return
        if not isinstance(sha256, str):
            await self._send_error(
                job_id, attempt, "model", "infer.request needs a string sha256"
            )
            return
        if timeout is not None and (
            not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
        ):
            await self._send_error(
                job_id,
                attempt,
                "model",
                f"timeout must be a number of seconds, got {timeout!r}",
                sha256=sha256,
            )
            return
        model = self.store.get(sha256)
        if model is None:
            await self._send_error(
                job_id,
                attempt,
                "node",
                f"model {sha256} is not loaded on this node",
                sha256=sha256,
            )
            return

        deadline = time.monotonic() + timeout if timeout and timeout > 0 else None
        self.in_flight += 1
        self._spawn(self._run(job_id, attempt, model, body, deadline))

    async def _run(
        self,
        job_id: str,
        attempt: int,
        model: LoadedModel,
        body: memoryview,
        deadline: float | None,
    ) -> None:
        try:
            result = await self.batcher.run(
                model, body, deadline=deadline, job_id=job_id
            )
            if self.fault == faults.FAULT_WRONG_OUTPUTS:
                correct = result.body
                shifted = await self.runner.submit(
                    lambda: faults.shift_outputs(correct)
                )
                result = replace(result, body=shifted)
        except InferenceError as exc:
            await self._send_error(
                job_id, attempt, exc.kind, str(exc), sha256=model.sha256
            )
            return
        except Exception as exc:
            # A bug in the agent must still produce a reply, or the gateway waits
            # until the job times out.
            logger.exception(
                "job %s attempt %d on model %s: internal error",
                job_id,
                attempt,
                model.sha256,
            )
            await self._send_error(
                job_id,
                attempt,
                "node",
                f"internal error in the node agent: {type(exc).__name__}: {exc}",
                sha256=model.sha256,
            )
            return
        finally:
            self.in_flight -= 1

        header = {
            "type": "infer.result",
            "job_id": job_id,
            "attempt": attempt,
            "elapsed_ms": result.elapsed_ms,
        }
        frame = encode_frame(header, result.body)
        if len(frame) > self.max_frame_bytes:
            # The output size follows from the input, so every replica would fail too.
            await self._send_error(
                job_id,
                attempt,
                "model",
                f"the output is {len(frame)} bytes, over the gateway's frame limit "
                f"of {self.max_frame_bytes} bytes",
                sha256=model.sha256,
            )
            return
        logger.debug(
            "job %s attempt %d on model %s: done in %.1fms, %d bytes of output",
            job_id,
            attempt,
            model.sha256,
            result.elapsed_ms,
            len(result.body),
        )
        await self._send_frame(
            frame, f"infer.result for job {job_id} attempt {attempt}"
        )

    async def _send_error(
        self,
        job_id: str,
        attempt: int,
        kind: ErrorKind,
        error: str,
        *,
        sha256: str | None = None,
    ) -> None:
        logger.warning(
            "job %s attempt %d on model %s: %s error: %s",
            job_id,
            attempt,
            sha256,
            kind,
            error,
        )
        await self._send_json(
            {
                "type": "infer.error",
                "job_id": job_id,
                "attempt": attempt,
                "kind": kind,
                "error": error,
            }
        )
