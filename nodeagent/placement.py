"""Handle ``model.offer``, ``model.chunk`` and ``model.evict`` from the gateway."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nodeagent.models import LoadedModel, ModelError, ModelStore, is_sha256
from nodeagent.transfer import Transfer, TransferError

logger = logging.getLogger(__name__)

SendJson = Callable[[dict[str, Any]], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None]], None]


class ModelReceiver:
    """Receives, loads and evicts models on behalf of the gateway.

    Transfers belong to one connection, so ``reset`` discards them when it
    drops and the gateway offers the model again after the next ``hello``.
    Disk writes, checks and loads run in one worker thread, in order, so two
    large models never load at the same time.
    """

    def __init__(self, store: ModelStore, *, send_json: SendJson, spawn: Spawn) -> None:
        self.store = store
        self._send_json = send_json
        self._spawn = spawn
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="grid-model"
        )
        self._transfers: dict[str, Transfer] = {}
        # Hashes whose chunks are dropped until their final chunk: the model is
        # already held or loading, its transfer failed, or it was never offered.
        self._skipped: set[str] = set()
        self._loading: set[str] = set()
        self._evict_after_load: set[str] = set()

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, function, *args)

    async def load_held(self) -> None:
        """Load the models kept from earlier runs, before the first ``hello``."""
        await self._in_thread(self.store.prepare)
        for model in await self._in_thread(self.store.scan):
            self.store.add(model)
        logger.info(
            "holding %d models in %s", len(self.store.held()), self.store.directory
        )

    async def offer(self, message: dict[str, Any]) -> None:
        sha256, size, model_id = message["sha256"], message["size"], message["model_id"]
        if not is_sha256(sha256):
            await self._fail(
                sha256, f"invalid sha256 {sha256!r}: expected 64 lowercase hex digits"
            )
            return

        if self.store.get(sha256) is not None:
            logger.info(
                "model %s (%s): already loaded, skipping its chunks", sha256, model_id
            )
            self._skip(sha256)
            await self._send_json({"type": "model.ready", "sha256": sha256})
            return
        if sha256 in self._loading:
            # The load in progress sends model.ready or model.failed when it ends.
            logger.info(
                "model %s (%s): already loading, skipping its chunks", sha256, model_id
            )
            self._evict_after_load.discard(sha256)
            self._skip(sha256)
            return

        if size < 0 or size > self.store.max_model_bytes:
            self._skip(sha256)
            await self._fail(
                sha256,
                f"model size {size} bytes is outside the node's limit of "
                f"{self.store.max_model_bytes} bytes (GRID_MAX_MODEL_BYTES)",
            )
            return
        free = shutil.disk_usage(self.store.incoming).free
        if size > free:
            self._skip(sha256)
            await self._fail(
                sha256, f"not enough disk space: {size} bytes needed, {free} free"
            )
            return

        previous = self._transfers.pop(sha256, None)
        if previous is not None:
            logger.warning(
                "model %s (%s): offered again, restarting its transfer",
                sha256,
                model_id,
            )
            await self._in_thread(previous.discard)
        self._skipped.discard(sha256)
        try:
            transfer = await self._in_thread(
                lambda: Transfer(
                    sha256=sha256, size=size, path=self.store.part_path(sha256)
                )
            )
        except OSError as exc:
            self._skip(sha256)
            await self._fail(sha256, f"cannot create the transfer file: {exc}")
            return
        self._transfers[sha256] = transfer
        logger.info("model %s (%s): receiving %d bytes", sha256, model_id, size)

    async def chunk(self, header: dict[str, Any], body: memoryview) -> None:
        sha256 = header.get("sha256")
        offset = header.get("offset")
        final = header.get("final")
        transfer = self._transfers.get(sha256) if isinstance(sha256, str) else None
        if transfer is None:
            if sha256 not in self._skipped:
                logger.warning(
                    "ignoring chunks of model %s: it was not offered", sha256
                )
                self._skip(sha256)
            if final is True:
                self._skipped.discard(sha256)
            return
        if (
            not isinstance(offset, int)
            or isinstance(offset, bool)
            or not isinstance(final, bool)
        ):
            await self._fail_transfer(
                transfer,
                "model.chunk needs an integer offset and a boolean final",
                final=False,
            )
            return

        try:
            await self._in_thread(transfer.write, offset, body)
        except (TransferError, OSError) as exc:
            await self._fail_transfer(transfer, str(exc), final=final)
            return
        if final:
            del self._transfers[sha256]
            self._loading.add(sha256)
            self._spawn(self._install(transfer))

    async def evict(self, message: dict[str, Any]) -> None:
        sha256 = message["sha256"]
        if not is_sha256(sha256):
            # Nothing can be held under such a name, so the eviction is already true.
            logger.warning(
                "model.evict for invalid sha256 %r: nothing to evict", sha256
            )
            await self._send_json({"type": "model.evicted", "sha256": sha256})
            return

        transfer = self._transfers.pop(sha256, None)
        if transfer is not None:
            self._skip(sha256)
            await self._in_thread(transfer.discard)
            logger.info("model %s: transfer cancelled by model.evict", sha256)
        if sha256 in self._loading:
            # Deleting the file now would race the load, so _install deletes it.
            self._evict_after_load.add(sha256)
            logger.info("model %s: will be evicted when its load ends", sha256)
        else:
            unloaded = self.store.unload(sha256) is not None
            deleted = await self._in_thread(self.store.delete, sha256)
            if unloaded or deleted:
                logger.info("model %s: evicted", sha256)
            else:
                logger.info("model %s: evicted, though it was not held", sha256)
        await self._send_json({"type": "model.evicted", "sha256": sha256})

    def reset(self) -> None:
        """Discard the transfers of a connection that dropped."""
        for sha256, transfer in self._transfers.items():
            logger.info(
                "model %s: transfer dropped with the connection after %d of %d bytes",
                sha256,
                transfer.received,
                transfer.size,
            )
            self._executor.submit(transfer.discard)
        self._transfers.clear()
        self._skipped.clear()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _skip(self, sha256: Any) -> None:
        if isinstance(sha256, str):
            self._skipped.add(sha256)

    async def _fail(self, sha256: str, error: str) -> None:
        logger.warning("model %s: failed: %s", sha256, error)
        await self._send_json(
            {"type": "model.failed", "sha256": sha256, "error": error}
        )

    async def _fail_transfer(
        self, transfer: Transfer, error: str, *, final: bool
    ) -> None:
        del self._transfers[transfer.sha256]
        if not final:
            self._skip(transfer.sha256)
        await self._in_thread(transfer.discard)
        await self._fail(transfer.sha256, error)

    def _install_blocking(self, transfer: Transfer) -> LoadedModel:
        try:
            part = transfer.finish()
        except TransferError:
            transfer.discard()
            raise
        return self.store.install(transfer.sha256, part)

    async def _install(self, transfer: Transfer) -> None:
        sha256 = transfer.sha256
        model: LoadedModel | None = None
        error = ""
        try:
            model = await self._in_thread(self._install_blocking, transfer)
        except (TransferError, ModelError) as exc:
            error = str(exc)
        except OSError as exc:
            error = f"cannot store the model file: {exc}"
        finally:
            self._loading.discard(sha256)

        if sha256 in self._evict_after_load:
            self._evict_after_load.discard(sha256)
            await self._in_thread(self.store.delete, sha256)
            logger.info("model %s: evicted after its load ended", sha256)
            return
        if model is None:
            await self._fail(sha256, error)
            return
        self.store.add(model)
        logger.info(
            "model %s: ready, %d bytes, inputs %s",
            sha256,
            model.size,
            ", ".join(model.input_names),
        )
        await self._send_json({"type": "model.ready", "sha256": sha256})
