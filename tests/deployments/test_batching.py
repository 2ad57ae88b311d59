"""``deployments.batching.BusyBatcher``: an idle encoder starts at once, what queues while it runs forms
the next batch, cancelled callers are left out, errors reach every caller of their batch only."""

from __future__ import annotations

import asyncio

import pytest

from deployments.batching import BusyBatcher


class Gate:
    """A batch function that records its batches and holds each one until released."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_with: Exception | None = None

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return [item.upper() for item in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _busy(gate: Gate, max_batch_size: int = 8) -> tuple[BusyBatcher, asyncio.Task]:
    """A batcher over ``gate`` whose first batch, ``["a"]``, is running (held by the gate)."""
    batcher = BusyBatcher(gate, max_batch_size=max_batch_size)
    first = asyncio.create_task(batcher.submit("a"))
    await asyncio.wait_for(gate.started.wait(), 5)
    return batcher, first


def test_a_lone_item_starts_at_once_and_what_queues_meanwhile_forms_the_next_batch():
    async def scenario():
        gate = Gate()
        batcher, first = await _busy(gate, max_batch_size=2)
        assert gate.batches == [["a"]]  # no waiting for company
        rest = [asyncio.create_task(batcher.submit(x)) for x in "bcd"]
        await _settle()
        assert batcher.queued == 3 and gate.batches == [["a"]]  # the encoder is busy: they queue
        gate.release.set()
        results = await asyncio.gather(first, *rest)
        assert results == ["A", "B", "C", "D"]  # each caller gets its own item's result
        assert gate.batches == [["a"], ["b", "c"], ["d"]]  # max_batch_size caps the next batch

    asyncio.run(scenario())


def test_a_caller_cancelled_while_queued_is_left_out_of_the_batch():
    async def scenario():
        gate = Gate()
        batcher, first = await _busy(gate)
        gone, kept = asyncio.create_task(batcher.submit("b")), asyncio.create_task(batcher.submit("c"))
        await _settle()
        gone.cancel()
        gate.release.set()
        assert await first == "A" and await kept == "C"
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert gate.batches == [["a"], ["c"]]

    asyncio.run(scenario())


def test_an_error_fails_every_caller_of_its_batch_and_the_next_batch_runs():
    async def scenario():
        gate = Gate()
        batcher, first = await _busy(gate)
        doomed = [asyncio.create_task(batcher.submit(x)) for x in "bc"]
        await _settle()
        gate.fail_with = RuntimeError("device fault")  # the running batch ["a"] fails
        gate.release.set()
        with pytest.raises(RuntimeError, match="device fault"):
            await first
        assert await asyncio.gather(*doomed) == ["B", "C"]  # the next batch is unaffected
        assert await batcher.submit("d") == "D"

    asyncio.run(scenario())


def test_a_wait_lets_a_batch_fill_and_a_full_batch_starts_at_once():
    async def scenario():
        seen: list[list[int]] = []

        async def double(items: list[int]) -> list[int]:
            seen.append(list(items))
            return [2 * i for i in items]

        batcher = BusyBatcher(double, max_batch_size=2, wait_s=30.0)  # a long wait: only a full batch starts
        a = asyncio.create_task(batcher.submit(1))
        await _settle()
        assert seen == []  # waiting for company
        assert await asyncio.wait_for(asyncio.gather(a, batcher.submit(2)), 5) == [2, 4]
        assert seen == [[1, 2]]

    asyncio.run(scenario())


def test_a_wrong_number_of_results_is_an_error_and_event_loops_can_change():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    batcher = BusyBatcher(short, max_batch_size=4)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        asyncio.run(batcher.submit(1))
    batcher.fn = lambda items: asyncio.sleep(0, result=list(items))
    assert asyncio.run(batcher.submit(7)) == 7  # a second asyncio.run: a fresh worker on the new loop
    with pytest.raises(ValueError, match="max_batch_size"):
        BusyBatcher(short, max_batch_size=0)


def test_a_caller_cancelled_during_its_batch_leaves_the_others_their_results():
    async def scenario():
        gate = Gate()
        batcher, first = await _busy(gate)
        gate.started.clear()
        b, c = asyncio.create_task(batcher.submit("b")), asyncio.create_task(batcher.submit("c"))
        await _settle()
        first_release, gate.release = gate.release, asyncio.Event()  # the next batch waits for its own
        first_release.set()
        assert await first == "A"
        await asyncio.wait_for(gate.started.wait(), 5)  # the batch ["b", "c"] is running
        b.cancel()
        gate.release.set()
        assert await c == "C"
        with pytest.raises(asyncio.CancelledError):
            await b
        assert gate.batches == [["a"], ["b", "c"]]

    asyncio.run(scenario())


def test_a_batch_function_raising_cancelled_error_fails_its_batch_only():
    """``fn``'s own CancelledError (not the worker's) must not end the worker and strand queued callers."""

    async def scenario():
        calls: list[list[str]] = []

        async def flaky(items: list[str]) -> list[str]:
            calls.append(list(items))
            await asyncio.sleep(0.01)
            if len(calls) == 1:
                raise asyncio.CancelledError()
            return [item.upper() for item in items]

        batcher = BusyBatcher(flaky, max_batch_size=8)
        first = asyncio.create_task(batcher.submit("a"))
        await _settle()
        later = asyncio.create_task(batcher.submit("b"))
        with pytest.raises(RuntimeError, match="batch function was cancelled"):
            await first
        assert await asyncio.wait_for(later, 5) == "B"

    asyncio.run(scenario())


def test_when_the_worker_stops_every_waiting_caller_is_cancelled():
    async def scenario():
        gate = Gate()
        batcher, running = await _busy(gate)
        queued = [asyncio.create_task(batcher.submit(x)) for x in "bc"]
        await _settle()
        batcher._worker.cancel()  # what the loop's shutdown does
        outcomes = await asyncio.wait_for(asyncio.gather(running, *queued, return_exceptions=True), 5)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)

    asyncio.run(scenario())


def test_an_idle_worker_holds_no_reference_to_the_last_batch():
    import gc
    import weakref

    class Item:
        pass

    async def scenario():
        async def echo(items):
            return [object() for _ in items]

        batcher = BusyBatcher(echo, max_batch_size=4)
        item = Item()
        ref = weakref.ref(item)
        await batcher.submit(item)
        del item
        await _settle()  # the worker is back to waiting for the next batch
        gc.collect()
        assert ref() is None

    asyncio.run(scenario())
