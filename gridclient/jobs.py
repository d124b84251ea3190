"""Asynchronous inference jobs: submit now, collect the outputs later.

``run_remote_inference(..., wait=False)`` submits each chunk of the dataset to
``POST /api/jobs/`` and returns one handle for them all: Job for GridNetwork
and AsyncJob for AsyncGridNetwork. The gateway keeps a job's output for a few
minutes after it finishes (GRID_RESULT_TTL, 300 s by default), so collect it
within that time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from . import tensors
from .core import Core, Flow, Sleep, gather, parse_json
from .exceptions import GridError, InvalidInput, NotFound
from .inference import (
    SAFETENSORS_TYPE,
    check_inference_options,
    check_output_rows,
    new_idempotency_key,
    prepare_chunks,
)
from .operations import SignatureCache

logger = logging.getLogger(__name__)

# Job polling interval in seconds: it starts at the first value and doubles up
# to the last, and starts again from the first after any job finishes.
POLL_FIRST = 0.05
POLL_MAX = 1.0

FINISHED = ("succeeded", "failed")


def check_wait_options(*, verify: int) -> None:
    if verify != 1:
        raise ValueError(
            f"verify={verify} needs wait=True: the jobs endpoint runs each job on "
            "one replica"
        )


def job_path(job_id: str, suffix: str = "") -> str:
    return f"/api/jobs/{quote(job_id, safe='')}/{suffix}"


def submit(
    core: Core,
    cache: SignatureCache,
    model_id: str,
    dataset: Any,
    *,
    timeout: float,
    batch_size: int | None,
    concurrency: int,
) -> Flow[JobState]:
    """Submit the dataset's chunks as jobs, ``concurrency`` requests at a time.

    When one submission fails, the jobs already accepted keep running on the
    gateway: their ids are logged with a warning, and the error is raised.
    """
    check_inference_options(verify=1, concurrency=concurrency)
    chunks, as_torch = yield from prepare_chunks(
        core, cache, model_id, dataset, batch_size
    )
    flows = [_submit_chunk(core, model_id, chunk, timeout) for chunk in chunks]
    accepted: dict[int, str] = {}

    def on_result(index: int, record: dict[str, Any]) -> None:
        accepted[index] = record["job_id"]

    try:
        records = yield from gather(flows, concurrency, on_result)
    except Exception as exc:
        if isinstance(exc, (InvalidInput, NotFound)):
            cache.forget(model_id)
        if accepted:
            logger.warning(
                "Submitting model %s failed after the gateway accepted jobs %s, "
                "which keep running: %s",
                model_id,
                ", ".join(accepted[index] for index in sorted(accepted)),
                exc,
            )
        raise

    logger.info("Submitted %d jobs for model %s", len(records), model_id)
    rows = [tensors.count_rows(chunk) for chunk in chunks]
    return JobState(
        core, model_id, records, rows=rows, as_torch=as_torch, concurrency=concurrency
    )


def _submit_chunk(
    core: Core, model_id: str, chunk: dict[str, Any], timeout: float
) -> Flow[dict[str, Any]]:
    # One Idempotency-Key per chunk makes a retried submission return the job
    # that the first request created, so every transport error is retried.
    response = yield from core.request(
        "POST",
        "/api/jobs/",
        idempotent=True,
        params={"model": model_id, "timeout": f"{timeout:g}"},
        content=tensors.encode(chunk),
        headers={
            "Content-Type": SAFETENSORS_TYPE,
            "Idempotency-Key": new_idempotency_key(),
        },
    )
    record = parse_json(response)
    if not isinstance(record, dict) or not record.get("job_id"):
        raise GridError(
            f"POST /api/jobs/ for model {model_id!r} returned no job_id",
            status=response.status_code,
            code="unexpected_response",
        )
    logger.debug("Job %s submitted for model %s", record["job_id"], model_id)
    return record


class JobState:
    """The jobs of one submitted dataset, with the last status fetched for each.

    ``records`` are the gateway's job JSON objects, in dataset order. The
    joined result is kept once fetched, so it is fetched only once.
    """

    def __init__(
        self,
        core: Core,
        model_id: str,
        records: list[dict[str, Any]],
        *,
        rows: list[int],
        as_torch: bool,
        concurrency: int,
    ) -> None:
        self.core = core
        self.model_id = model_id
        self.job_ids = tuple(str(record["job_id"]) for record in records)
        self.records = dict(zip(self.job_ids, records, strict=True))
        self.rows = rows
        self.as_torch = as_torch
        self.concurrency = concurrency
        self.result: Any = None
        self.has_result = False

    @property
    def status(self) -> str:
        """Return "failed" if any job failed, else "succeeded" if all did.

        Otherwise "queued" while every job is queued, else "running".
        """
        statuses = [self.records[job_id]["status"] for job_id in self.job_ids]
        if "failed" in statuses:
            return "failed"
        if all(status == "succeeded" for status in statuses):
            return "succeeded"
        if all(status == "queued" for status in statuses):
            return "queued"
        return "running"

    def refresh(self) -> Flow[str]:
        """Fetch the status of every unfinished job and return the overall one."""
        unfinished = [
            job_id
            for job_id in self.job_ids
            if self.records[job_id]["status"] not in FINISHED
        ]
        flows = [self.core.get_json(job_path(job_id)) for job_id in unfinished]
        records = yield from gather(flows, self.concurrency)
        for job_id, record in zip(unfinished, records, strict=True):
            self.records[job_id] = record
        return self.status

    def wait_result(self, timeout: float | None) -> Flow[Any]:
        """Poll until every job finished, then fetch and join their outputs.

        Raises the typed exception of the first failed job in dataset order as
        soon as any job failed, and TimeoutError when jobs are still unfinished
        after ``timeout`` seconds. The jobs keep running after a TimeoutError.
        """
        if self.has_result:
            return self.result
        deadline = None if timeout is None else self.core.clock() + timeout
        interval = POLL_FIRST
        finished = 0
        while True:
            status = yield from self.refresh()
            if status == "failed":
                yield from self._raise_failure()
            if status == "succeeded":
                break

            now_finished = sum(
                self.records[job_id]["status"] in FINISHED for job_id in self.job_ids
            )
            if now_finished > finished:
                finished, interval = now_finished, POLL_FIRST
            delay = interval
            if deadline is not None:
                remaining = deadline - self.core.clock()
                if remaining <= 0:
                    raise self._timed_out(timeout)
                delay = min(delay, remaining)
            yield Sleep(delay)
            interval = min(interval * 2, POLL_MAX)

        flows = [self._fetch_output(index) for index in range(len(self.job_ids))]
        outputs = yield from gather(flows, self.concurrency)
        self.result = tensors.to_result(tensors.concatenate(outputs), self.as_torch)
        self.has_result = True
        return self.result

    def _fetch_output(self, index: int) -> Flow[dict[str, Any]]:
        job_id = self.job_ids[index]
        path = self.records[job_id].get("result_url") or job_path(job_id, "result/")
        response = yield from self.core.request("GET", path, idempotent=True)
        outputs = tensors.decode(response.content)
        if len(self.job_ids) > 1:
            check_output_rows(outputs, self.rows[index], index)
        return outputs

    def _raise_failure(self) -> Flow[None]:
        """Raise the typed exception of the first failed job, from its result URL."""
        job_id = next(
            job_id
            for job_id in self.job_ids
            if self.records[job_id]["status"] == "failed"
        )
        # The result URL of a failed job returns its error with the status the
        # gateway gives that error code, such as 422 for model_error. No retry:
        # a 503 here is the job's outcome, not a busy gateway.
        yield from self.core.request(
            "GET", job_path(job_id, "result/"), idempotent=True, retries=0
        )
        record = self.records[job_id]
        raise GridError(
            f"job {job_id} of model {self.model_id!r} failed with "
            f"{record.get('error_code')}: {record.get('error')}",
            code=str(record.get("error_code") or "inference_failed"),
        )

    def _timed_out(self, timeout: float | None) -> TimeoutError:
        unfinished = [
            job_id
            for job_id in self.job_ids
            if self.records[job_id]["status"] not in FINISHED
        ]
        return TimeoutError(
            f"{len(unfinished)} of {len(self.job_ids)} jobs of model "
            f"{self.model_id!r} are still running after {timeout:g}s "
            f"({', '.join(unfinished)}); they keep running, so call result() again"
        )


class JobBase:
    def __init__(self, state: JobState) -> None:
        self._state = state

    @property
    def job_ids(self) -> tuple[str, ...]:
        """The gateway's job ids, one per chunk, in dataset order."""
        return self._state.job_ids

    @property
    def model_id(self) -> str:
        return self._state.model_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model_id={self.model_id!r}, "
            f"jobs={len(self.job_ids)}, status={self._state.status!r})"
        )


class Job(JobBase):
    """The jobs of one ``GridNetwork.run_remote_inference(..., wait=False)`` call.

    Each method sends requests through the client that created the handle, so
    that client must still be open.
    """

    def __init__(self, state: JobState, run: Callable[[Flow[Any]], Any]) -> None:
        super().__init__(state)
        self._run = run

    def status(self) -> str:
        """Fetch the jobs' status: "queued", "running", "succeeded" or "failed".

        "failed" means at least one job failed, and "succeeded" that all did.
        """
        return self._run(self._state.refresh())

    def done(self) -> bool:
        """Fetch the status and return whether result() would return or raise at once."""
        return self.status() in FINISHED

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the jobs and return their joined outputs.

        Returns what run_remote_inference returns for the same dataset, and
        raises the typed exception of a failed job, such as ModelError or
        GatewayTimeout. ``timeout`` is in seconds, None waits until the jobs
        end, which the gateway's deadline on each job guarantees. Raises
        TimeoutError when jobs are still running after ``timeout``.
        """
        return self._run(self._state.wait_result(timeout))


class AsyncJob(JobBase):
    """The jobs of one ``AsyncGridNetwork.run_remote_inference(..., wait=False)`` call.

    The methods are coroutines with the results of Job's.
    """

    def __init__(
        self, state: JobState, run: Callable[[Flow[Any]], Awaitable[Any]]
    ) -> None:
        super().__init__(state)
        self._run = run

    async def status(self) -> str:
        """See Job.status."""
        return await self._run(self._state.refresh())

    async def done(self) -> bool:
        """See Job.done."""
        return await self.status() in FINISHED

    async def result(self, timeout: float | None = None) -> Any:
        """See Job.result."""
        return await self._run(self._state.wait_result(timeout))
