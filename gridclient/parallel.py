"""Run the flows of a Gather effect concurrently, for the sync and async runners.

Both functions keep a window of at most ``gather.limit`` running flows and
take the next flow from ``gather.flows`` only when one ends. An inference
flow encodes its request body when it starts, so the window also bounds the
encoded bodies in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from .core import Flow, Gather

logger = logging.getLogger(__name__)


def gather_in_threads(run: Callable[[Flow[Any]], Any], gather: Gather) -> list[Any]:
    """Run the flows with ``run`` on a thread pool and return their results in order.

    After a failure, the requests already sent still run to their end, because
    a thread cannot be stopped, and then the first failure is raised.
    """
    flows: Iterator[tuple[int, Flow[Any]]] = enumerate(gather.flows)
    results: dict[int, Any] = {}
    running: dict[Future[Any], int] = {}
    with ThreadPoolExecutor(
        max_workers=gather.limit, thread_name_prefix="gridclient"
    ) as pool:
        try:
            while True:
                while len(running) < gather.limit:
                    item = next(flows, None)
                    if item is None:
                        break
                    running[pool.submit(run, item[1])] = item[0]
                if not running:
                    break

                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=running.__getitem__):
                    index = running.pop(future)
                    results[index] = future.result()
                    if gather.on_result is not None:
                        gather.on_result(index, results[index])
        finally:
            for future in running:
                future.cancel()
            if running:
                logger.debug("Waiting for %d requests in flight to end", len(running))
    return [results[index] for index in range(len(results))]


async def gather_in_tasks(
    run: Callable[[Flow[Any]], Awaitable[Any]], gather: Gather
) -> list[Any]:
    """Run the flows with ``run`` as asyncio tasks and return their results in order.

    After a failure, or when the caller is cancelled, the tasks still running
    are cancelled and awaited before the failure propagates.
    """
    flows: Iterator[tuple[int, Flow[Any]]] = enumerate(gather.flows)
    results: dict[int, Any] = {}
    running: dict[asyncio.Task[Any], int] = {}
    try:
        while True:
            while len(running) < gather.limit:
                item = next(flows, None)
                if item is None:
                    break
                running[asyncio.ensure_future(run(item[1]))] = item[0]
            if not running:
                break

            finished, _ = await asyncio.wait(
                running, return_when=asyncio.FIRST_COMPLETED
            )
            ordered = sorted((running.pop(task), task) for task in finished)
            # Read every finished task's exception before raising one, so that
            # asyncio logs none of them as never retrieved.
            errors = [task.exception() for _, task in ordered]
            error = next((exc for exc in errors if exc is not None), None)
            if error is not None:
                raise error
            for index, task in ordered:
                results[index] = task.result()
                if gather.on_result is not None:
                    gather.on_result(index, results[index])
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
    return [results[index] for index in range(len(results))]
