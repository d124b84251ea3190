"""GridNetwork, the synchronous client for a Grid gateway."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from . import datasets, inference, jobs, operations
from .base import ClientBase
from .core import Flow, Gather, Send, Sleep
from .export import prepare_archive
from .info import InferenceInfo, ModelInfo, Placement
from .jobs import Job
from .parallel import gather_in_threads

T = TypeVar("T")


class GridNetwork(ClientBase):
    """A connection to a Grid gateway, which routes requests to the nodes.

    Use it as a context manager, or call close() when done. One instance may be
    shared by several threads. See ClientBase for the constructor arguments.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries, clock=clock)
        self._http = httpx.Client(transport=transport)
        self._sleep = sleep

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _run(self, flow: Flow[T]) -> T:
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    effect = flow.send(value) if error is None else flow.throw(error)
                except StopIteration as stop:
                    return stop.value
                value, error = None, None
                if isinstance(effect, Sleep):
                    self._sleep(effect.seconds)
                elif isinstance(effect, Send):
                    try:
                        value = self._http.send(effect.request)
                    except httpx.TransportError as exc:
                        error = exc
                elif isinstance(effect, Gather):
                    try:
                        value = gather_in_threads(self._run, effect)
                    # Any error of a gathered flow goes back into the flow
                    # that gathered it, as the error of a Send does.
                    except Exception as exc:  # noqa: BLE001
                        error = exc
        finally:
            # Closes progress bars when an interrupt or cancellation stops
            # the flow between two effects.
            flow.close()

    def serve_model(
        self,
        model: Any,
        model_id: str,
        allow_remote_inference: bool = False,
        allow_download: bool = False,
        replicas: int = 1,
        example_inputs: Any = None,
        wait: bool = True,
        timeout: float = 300,
        progress: bool = True,
        *,
        input_signature: list[dict[str, Any]] | None = None,
    ) -> ModelInfo:
        """Export and upload a model, then wait until the gateway has placed it.

        ``model`` is an nn.Module (exported with a dynamic batch at dim 0 of
        every input), a torch.export.ExportedProgram, or the bytes or path of a
        saved .pt2 archive, which needs ``input_signature``. Without
        ``example_inputs``, the inputs stored by ``gr.build(model, data)`` are
        used.

        Returns the model info once the model is ready, or degraded with a
        logged warning. With ``wait=False`` it returns right after the upload.
        Raises PlacementError when placement failed, and PlacementTimeout when
        the model is still placing after ``timeout`` seconds.
        """
        archive, signature = prepare_archive(model, example_inputs, input_signature)
        return self._run(
            operations.serve(
                self._core,
                self._signatures,
                archive,
                signature,
                model_id=model_id,
                allow_remote_inference=allow_remote_inference,
                allow_download=allow_download,
                replicas=replicas,
                wait=wait,
                timeout=timeout,
                progress=progress,
            )
        )

    def run_remote_inference(
        self,
        model_id: str,
        dataset: Any,
        *,
        wait: bool = True,
        timeout: float = 30.0,
        batch_size: int | None = None,
        progress: bool | None = None,
        verify: int = 1,
        concurrency: int = 4,
        aggregate: bool = False,
        raw_outputs: bool = False,
    ) -> Any:
        """Run a served model on a dataset and return its outputs.

        ``dataset`` is a torch tensor or numpy array for a one-input model, or
        a dict from input name to tensor. It is sent in chunks along dim 0 of at
        most ``batch_size`` rows (default: about 8 MB of input each), up to
        ``concurrency`` requests at once, and the outputs are joined in order.
        ``timeout`` is the gateway's limit in seconds for each chunk.
        ``verify=2`` runs each chunk on two replicas and raises
        VerificationMismatch when their outputs differ.

        Returns a torch tensor when the input was torch, else a numpy array,
        and a dict keyed ``output_0``, ``output_1``... when the model has
        several outputs. ``progress=None`` shows a bar only for several chunks.

        With ``wait=False``, submits the chunks as gateway jobs and returns a
        Job at once, whose ``result()`` returns the same outputs later. Such a
        call takes only ``verify=1`` and shows no progress bar.

        When ``dataset`` is a search() result (or a DatasetRef), the model runs
        on the node that holds the dataset and its rows never leave it: this
        returns a numpy int64 array with the argmax class of each row, a
        summary dict with ``aggregate=True`` (class counts, and accuracy when
        the dataset has labels), or the raw outputs with ``raw_outputs=True``
        when the dataset's manifest allows them. ``timeout`` covers the whole
        dataset, and such a call takes only ``wait=True``.
        """
        ref = datasets.check_options(dataset, aggregate=aggregate, raw_outputs=raw_outputs)
        if ref is not None and not wait:
            raise ValueError("a dataset held on a node runs only with wait=True")
        if not wait:
            return self._submit_jobs(
                model_id,
                dataset,
                timeout=timeout,
                batch_size=batch_size,
                verify=verify,
                concurrency=concurrency,
            )
        result, _ = self.run_remote_inference_with_info(
            model_id,
            dataset,
            timeout=timeout,
            batch_size=batch_size,
            progress=progress,
            verify=verify,
            concurrency=concurrency,
            aggregate=aggregate,
            raw_outputs=raw_outputs,
        )
        return result

    def run_remote_inference_with_info(
        self,
        model_id: str,
        dataset: Any,
        *,
        timeout: float = 30.0,
        batch_size: int | None = None,
        progress: bool | None = None,
        verify: int = 1,
        concurrency: int = 4,
        aggregate: bool = False,
        raw_outputs: bool = False,
    ) -> tuple[Any, InferenceInfo]:
        """Run run_remote_inference and also return the jobs, nodes and attempts."""
        ref = datasets.check_options(dataset, aggregate=aggregate, raw_outputs=raw_outputs)
        if ref is not None:
            return self._run(
                datasets.run_dataset_inference(
                    self._core,
                    model_id,
                    ref,
                    aggregate=aggregate,
                    raw_outputs=raw_outputs,
                    timeout=timeout,
                )
            )
        return self._run(
            inference.run_inference(
                self._core,
                self._signatures,
                model_id,
                dataset,
                timeout=timeout,
                batch_size=batch_size,
                progress=progress,
                verify=verify,
                concurrency=concurrency,
            )
        )

    def _submit_jobs(
        self,
        model_id: str,
        dataset: Any,
        *,
        timeout: float,
        batch_size: int | None,
        verify: int,
        concurrency: int,
    ) -> Job:
        jobs.check_wait_options(verify=verify)
        state = self._run(
            jobs.submit(
                self._core,
                self._signatures,
                model_id,
                dataset,
                timeout=timeout,
                batch_size=batch_size,
                concurrency=concurrency,
            )
        )
        return Job(state, self._run)

    def get_model(self, model_id: str) -> ModelInfo:
        return self._run(operations.get_model(self._core, model_id))

    def available_models(self, search: str | None = None) -> list[ModelInfo]:
        """List the models that this token can see, or those whose id contains ``search``."""
        return self._run(operations.list_models(self._core, search))

    def connected_nodes(self) -> list[dict[str, Any]]:
        """List every node registered with the gateway, with its ``status``.

        ``status`` is "online", "offline" or "draining". Offline nodes stay in
        the list, so callers can watch a node go down and come back.
        """
        return self._run(operations.list_nodes(self._core))

    def search_model(self, model_id: str) -> list[Placement]:
        """List the ready replicas of a model on online nodes."""
        return self._run(operations.search_model(self._core, model_id))

    def search(self, *tags: str, include_offline: bool = False) -> list[dict[str, Any]]:
        """List the datasets that carry all the given tags.

        Only datasets on online nodes are listed unless ``include_offline``.
        """
        return self._run(operations.search(self._core, tags, include_offline))

    def available_tags(self, include_offline: bool = False) -> list[str]:
        """List the tags of the datasets on online nodes, or on every node."""
        return self._run(operations.available_tags(self._core, include_offline))

    def update_model(
        self,
        model_id: str,
        *,
        allow_remote_inference: bool | None = None,
        allow_download: bool | None = None,
    ) -> ModelInfo:
        """Change who may run or download a model and return its new info.

        An argument left as None keeps its value. Only the model's owner or
        staff may change a model, with a token that has the serve scope.
        """
        changes: dict[str, bool] = {}
        if allow_remote_inference is not None:
            changes["allow_remote_inference"] = allow_remote_inference
        if allow_download is not None:
            changes["allow_download"] = allow_download
        return self._run(operations.update_model(self._core, model_id, changes))

    def download_model(self, model_id: str, path: str | os.PathLike[str] | None = None, *, timeout: float = 600.0) -> bytes:
        """Download a model's .pt2 file, streamed by the gateway from one of its replicas.

        Needs the model's ``allow_download``. Checks the bytes against the
        version's SHA-256 and, with ``path``, also writes them there. Load the
        file with torch.export.load only if you trust the model's owner.
        """
        data = self._run(operations.download_model(self._core, model_id, timeout))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def delete_model(self, model_id: str) -> None:
        self._signatures.forget(model_id)
        self._run(operations.delete_model(self._core, model_id))

    def disconnect_nodes(self) -> int:
        """Disconnect every node and return how many the gateway disconnected.

        Needs a staff token. A disconnected agent does not reconnect until it is
        restarted.
        """
        return self._run(operations.disconnect_nodes(self._core))
