"""AsyncGridNetwork, the asyncio client with the same methods as GridNetwork."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from . import datasets, inference, jobs, operations
from .base import ClientBase
from .core import Flow, Gather, Send, Sleep
from .export import prepare_archive
from .info import InferenceInfo, ModelInfo, Placement
from .jobs import AsyncJob
from .parallel import gather_in_tasks

T = TypeVar("T")


class AsyncGridNetwork(ClientBase):
    """An asyncio connection to a Grid gateway.

    Every method is a coroutine with the arguments and results of the same
    method on GridNetwork. Use it with ``async with``, or await aclose().
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(url, token, timeout=timeout, retries=retries, clock=clock)
        self._http = httpx.AsyncClient(transport=transport)
        self._sleep = sleep

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def close(self) -> None:
        """Same as aclose(), named like GridNetwork.close()."""
        await self.aclose()

    async def _run(self, flow: Flow[T]) -> T:
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
                    await self._sleep(effect.seconds)
                elif isinstance(effect, Send):
                    try:
                        value = await self._http.send(effect.request)
                    except httpx.TransportError as exc:
                        error = exc
                elif isinstance(effect, Gather):
                    try:
                        value = await gather_in_tasks(self._run, effect)
                    # Any error of a gathered flow goes back into the flow
                    # that gathered it, as the error of a Send does.
                    except Exception as exc:  # noqa: BLE001
                        error = exc
        finally:
            # Closes progress bars when an interrupt or cancellation stops
            # the flow between two effects.
            flow.close()

    async def serve_model(
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
        """See GridNetwork.serve_model. The export runs in a worker thread."""
        archive, signature = await asyncio.to_thread(
            prepare_archive, model, example_inputs, input_signature
        )
        return await self._run(
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

    async def run_remote_inference(
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
        """See GridNetwork.run_remote_inference. ``wait=False`` returns an AsyncJob."""
        ref = datasets.check_options(dataset, aggregate=aggregate, raw_outputs=raw_outputs)
        if ref is not None and not wait:
            raise ValueError("a dataset held on a node runs only with wait=True")
        if not wait:
            jobs.check_wait_options(verify=verify)
            state = await self._run(
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
            return AsyncJob(state, self._run)
        result, _ = await self.run_remote_inference_with_info(
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

    async def run_remote_inference_with_info(
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
        """See GridNetwork.run_remote_inference_with_info."""
        ref = datasets.check_options(dataset, aggregate=aggregate, raw_outputs=raw_outputs)
        if ref is not None:
            return await self._run(
                datasets.run_dataset_inference(
                    self._core,
                    model_id,
                    ref,
                    aggregate=aggregate,
                    raw_outputs=raw_outputs,
                    timeout=timeout,
                )
            )
        return await self._run(
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

    async def get_model(self, model_id: str) -> ModelInfo:
        return await self._run(operations.get_model(self._core, model_id))

    async def available_models(self, search: str | None = None) -> list[ModelInfo]:
        return await self._run(operations.list_models(self._core, search))

    async def connected_nodes(self) -> list[dict[str, Any]]:
        return await self._run(operations.list_nodes(self._core))

    async def search_model(self, model_id: str) -> list[Placement]:
        return await self._run(operations.search_model(self._core, model_id))

    async def search(
        self, *tags: str, include_offline: bool = False
    ) -> list[dict[str, Any]]:
        return await self._run(operations.search(self._core, tags, include_offline))

    async def available_tags(self, include_offline: bool = False) -> list[str]:
        return await self._run(operations.available_tags(self._core, include_offline))

    async def update_model(
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
        return await self._run(operations.update_model(self._core, model_id, changes))

    async def download_model(self, model_id: str, path: str | os.PathLike[str] | None = None, *, timeout: float = 600.0) -> bytes:
        """Download a model's .pt2 file, streamed by the gateway from one of its replicas.

        Needs the model's ``allow_download``. Checks the bytes against the
        version's SHA-256 and, with ``path``, also writes them there. Load the
        file with torch.export.load only if you trust the model's owner.
        """
        data = await self._run(operations.download_model(self._core, model_id, timeout))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def delete_model(self, model_id: str) -> None:
        self._signatures.forget(model_id)
        await self._run(operations.delete_model(self._core, model_id))

    async def disconnect_nodes(self) -> int:
        return await self._run(operations.disconnect_nodes(self._core))
