"""Batching for the vision stage: the requests that arrive while a batch runs form the next batch.

Ray Serve's ``@serve.batch`` (2.60) batches by time window: its loop takes the first queued request,
waits up to ``batch_wait_timeout_s`` for more, hands the batch to a task that then waits for the
concurrency permit, and at once starts forming the next batch (``_process_batches`` in
``ray/serve/batching.py``). So a lone request always waits the whole window, and under load a batch
holds only what arrived within one window, not what queued while the previous forward ran. The vision
stage wants the opposite, as a GPU engine's scheduler does: an idle encoder starts at once, and
everything that queued while it was busy (up to ``max_batch_size``) goes into its next forward.

:class:`BusyBatcher` does that with one worker task per event loop. A caller cancelled before its batch
starts is left out of it; one cancelled while its batch runs simply does not get the result. The batch
function returns one result per item, in order (a per-item exception is a result like any other); an
exception it raises fails every caller of that batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class BusyBatcher(Generic[T, R]):
    """Runs ``fn`` on batches of submitted items: whatever queued while the previous batch ran.

    Parameters
    ----------
    fn : callable
        ``async fn(items: list[T]) -> list[R]``, one result per item, in order.
    max_batch_size : int
        Most items per batch.
    wait_s : float
        How long a batch that is not full waits for more items before it starts (0: never wait; the
        items that arrive while it runs form the next batch anyway).
    """

    def __init__(self, fn: Callable[[list[T]], Awaitable[list[R]]], max_batch_size: int, wait_s: float = 0.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, got {wait_s}")
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def queued(self) -> int:
        """Items waiting for a batch (not counting the one running)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: T) -> R:
        """``item``'s result, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            # First call, or a new event loop (tests run one per asyncio.run): a queue and worker of its own.
            # The worker starts with an empty context, so it carries no request's context variables.
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue), context=contextvars.Context())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _next_batch(self, queue: asyncio.Queue) -> list[tuple[T, asyncio.Future[R]]]:
        batch = [await queue.get()]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self, queue: asyncio.Queue) -> None:
        while True:
            batch = [(item, future) for item, future in await self._next_batch(queue) if not future.done()]
            if not batch:  # every caller of this batch was cancelled while it queued
                continue
            try:
                results = await self.fn([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"the batch function returned {len(results)} results for {len(batch)} items"
                    )
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:  # the worker itself is cancelled (the loop shuts down): so are its callers
                for _, future in batch:
                    future.cancel()
                raise
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
