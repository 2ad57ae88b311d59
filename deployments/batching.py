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
exception it raises (a ``CancelledError`` of its own included) fails every caller of that batch, and the
worker goes on. When the worker itself stops (its event loop shuts down) every caller still waiting is
cancelled; none is left hanging. Serve's ``serve_batch_*`` metrics do not exist for this batcher: the
vision stage reports its own counters (``batches``, ``requests``, ``max_batch_requests`` in its stats).
"""

from __future__ import annotations

import asyncio
import contextvars
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
        """Items waiting for a batch (not counting the running one; callers cancelled meanwhile included)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: T) -> R:
        """``item``'s result, computed in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            if self._worker is not None and not self._worker.done() and not self._loop.is_closed():
                # A Serve replica runs its user code on one event loop; two live loops would run ``fn`` on
                # two threads at once, which the vision stage's batch body does not allow.
                raise RuntimeError("BusyBatcher is in use on another running event loop")
            # First call, or a new event loop (tests run one per asyncio.run): a queue and worker of its own.
            # The worker starts with an empty context, so it carries no request's context variables (as
            # Serve's own batching unsets the request context).
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue), context=contextvars.Context())
        future: asyncio.Future[R] = loop.create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _fill(self, queue: asyncio.Queue, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        """Put the next batch into ``batch``: callers still waiting, the first blocking until one comes."""
        loop = asyncio.get_running_loop()
        while not batch:
            item = await queue.get()
            if not item[1].done():  # a caller cancelled while it queued is left out
                batch.append(item)
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not queue.empty():
                item = queue.get_nowait()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):  # a cancelled get leaves its item queued
                        item = await queue.get()
                except TimeoutError:
                    break
            if not item[1].done():
                batch.append(item)

    async def _run(self, queue: asyncio.Queue) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while True:
                await self._fill(queue, batch)
                await self._run_batch(batch)
                batch = []  # nothing of a finished batch stays referenced while the worker idles
        finally:  # the worker ends (its loop shuts down): no caller may be left waiting
            for _, future in batch:
                future.cancel()
            while not queue.empty():
                queue.get_nowait()[1].cancel()

    async def _run_batch(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.fn([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"the batch function returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError as exc:
            if asyncio.current_task().cancelling():  # the worker itself is being cancelled
                raise
            # ``fn`` raised CancelledError of its own (e.g. an executor future cancelled under it): that
            # batch fails, the worker goes on.
            error = RuntimeError("the batch function was cancelled")
            error.__cause__ = exc
            self._fail(batch, error)
            return
        except Exception as exc:
            self._fail(batch, exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[T, asyncio.Future[R]]], error: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
