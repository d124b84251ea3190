"""AsyncGridNetwork, the asyncio client with the same methods as GridNetwork."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx

from . import operations
from .base import ClientBase
from .core import Flow, Send, Sleep
from .export import prepare_archive
from .info import InferenceInfo, ModelInfo, Placement

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
        timeout: float = 30.0,
        batch_size: int | None = None,
        progress: bool | None = None,
    ) -> Any:
        """See GridNetwork.run_remote_inference."""
        result, _ = await self.run_remote_inference_with_info(
            model_id, dataset, timeout=timeout, batch_size=batch_size, progress=progress
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
    ) -> tuple[Any, InferenceInfo]:
        """See GridNetwork.run_remote_inference_with_info."""
        return await self._run(
            operations.run_inference(
                self._core,
                self._signatures,
                model_id,
                dataset,
                timeout=timeout,
                batch_size=batch_size,
                progress=progress,
            )
        )

    async def get_model(self, model_id: str) -> ModelInfo:
        return await self._run(operations.get_model(self._core, model_id))

    async def available_models(self) -> list[ModelInfo]:
        return await self._run(operations.list_models(self._core))

    async def connected_nodes(self) -> list[dict[str, Any]]:
        return await self._run(operations.list_nodes(self._core))

    async def search_model(self, model_id: str) -> list[Placement]:
        return await self._run(operations.search_model(self._core, model_id))

    async def search(
        self, *tags: str, include_offline: bool = False
    ) -> list[dict[str, Any]]:
        return await self._run(operations.search(self._core, tags, include_offline))

    async def available_tags(self) -> list[str]:
        return await self._run(operations.available_tags(self._core))

    async def delete_model(self, model_id: str) -> None:
        self._signatures.forget(model_id)
        await self._run(operations.delete_model(self._core, model_id))

    async def disconnect_nodes(self) -> int:
        return await self._run(operations.disconnect_nodes(self._core))
