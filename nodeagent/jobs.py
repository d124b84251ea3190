"""Run inference requests and send an ``infer.result`` or ``infer.error`` for each."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from gridproto.frames import encode_frame
from nodeagent.config import DEFAULT_WS_MAX_BYTES
from nodeagent.models import LoadedModel, ModelStore
from nodeagent.runner import ErrorKind, InferenceError, Runner

logger = logging.getLogger(__name__)

SendJson = Callable[[dict[str, Any]], Awaitable[None]]
SendFrame = Callable[[bytes, str], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class JobHandler:
    """Starts inference requests on the runner and sends each result or error.

    ``in_flight`` counts requests that are accepted and not yet finished,
    queued ones included, for the heartbeat.
    """

    def __init__(
        self,
        store: ModelStore,
        runner: Runner,
        *,
        send_json: SendJson,
        send_frame: SendFrame,
        spawn: Spawn,
    ) -> None:
        self.store = store
        self.runner = runner
        self.in_flight = 0
        # The gateway's frame limit from welcome. The gateway closes the
        # connection with 1009 on a larger frame.
        self.max_frame_bytes = DEFAULT_WS_MAX_BYTES
        self._send_json = send_json
        self._send_frame = send_frame
        self._spawn = spawn

    async def request(self, header: dict[str, Any], body: memoryview) -> None:
        job_id, attempt = header.get("job_id"), header.get("attempt")
        if not isinstance(job_id, str) or not _is_int(attempt):
            logger.warning(
                "ignoring an infer.request without a string job_id and an integer "
                "attempt: job_id=%r attempt=%r",
                job_id,
                attempt,
            )
            return

        sha256, timeout = header.get("sha256"), header.get("timeout")
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
            result = await self.runner.run(model, body, deadline=deadline)
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
