"""AsyncLLMEngine: streaming deltas, concurrency, abort frees KV, bad requests leave it serving."""

import asyncio

import pytest

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import AsyncLLMEngine, LLMEngine, RequestError, RequestOutput, SamplingParams
from zipvl_ray.engine.async_engine import _merged

from .conftest import mixed_prompts


@pytest.fixture(scope="module")
def engine(tiny_llava):
    model, processor = tiny_llava
    core = LLMEngine(
        model,
        processor,
        zipvl=ZipVLConfig(tau=0.9),
        engine=EngineConfig(kv_cache_bytes=8 << 20, max_model_len=2048),
    )
    eng = AsyncLLMEngine(core)
    yield eng
    eng.shutdown()


async def collect(eng, request_id, prompt, sampling):
    outs = [out async for out in eng.generate(request_id, prompt, sampling)]
    return outs


def test_streaming_deltas_add_up(engine):
    outs = asyncio.run(
        collect(engine, "s1", mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=8, ignore_eos=True))
    )
    final = outs[-1]
    assert final.finished and final.finish_reason == "length"
    assert sum((o.delta_token_ids for o in outs), []) == final.token_ids
    assert "".join(o.delta_text for o in outs) == final.text
    assert final.metrics.ttft_s is not None and final.metrics.ttft_s > 0


def test_streamed_logprob_deltas_add_up_to_the_final_entries(engine):
    outs = asyncio.run(
        collect(
            engine,
            "lp",
            mixed_prompts(n_images=(1,))[0],
            SamplingParams(max_tokens=8, ignore_eos=True, logprobs=2),
        )
    )
    final = outs[-1]
    assert len(final.logprobs) == len(final.token_ids) == 8
    assert sum((o.delta_logprobs for o in outs), []) == final.logprobs
    assert [e["token_id"] for e in final.logprobs] == final.token_ids
    plain = asyncio.run(
        collect(engine, "plain", mixed_prompts(n_images=(1,))[0], SamplingParams(max_tokens=2))
    )
    assert all(o.logprobs is None and o.delta_logprobs is None for o in plain)


def test_outputs_that_queued_behind_a_slow_consumer_go_out_as_one(engine):
    """A consumer slower than the engine gets what queued meanwhile as one output (deltas concatenated,
    the latest state), as vLLM's output collector does: one Ray streaming item and one SSE event for many
    tokens. Here the consumer reads the first output, then waits until the request has finished: the rest
    come as one (the first may hold two or more if this loop lagged), and the deltas add up to the answer."""

    async def main():
        stream = engine.generate(
            "slow", mixed_prompts(n_images=(1,))[0], SamplingParams(max_tokens=20, ignore_eos=True)
        )
        outs = [await anext(stream)]
        while engine.stats().num_finished == finished_before:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the last step's outputs reach this loop's queue
        outs += [out async for out in stream]
        return outs

    finished_before = engine.stats().num_finished
    outs = asyncio.run(main())
    assert len(outs) <= 2 and outs[-1].finished and outs[-1].finish_reason == "length"
    assert all(o.delta_token_ids for o in outs) and len(outs[-1].delta_token_ids) >= 10
    assert sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids
    assert "".join(o.delta_text for o in outs) == outs[-1].text


def test_merging_a_backlog_keeps_every_delta_in_order_and_the_latest_state():
    outs = [
        RequestOutput(
            "m",
            token_ids=[1, 2, 3][: i + 1],
            text="abc"[: i + 1],
            delta_token_ids=[i + 1],
            delta_text="abc"[i],
            finished=i == 2,
            finish_reason="length" if i == 2 else None,
        )
        for i in range(3)
    ]
    merged = _merged(outs)
    assert merged is outs[-1] and merged.finished and merged.finish_reason == "length"
    assert merged.delta_token_ids == [1, 2, 3] and merged.delta_text == "abc"
    entries = [{"token_id": i, "logprob": -float(i), "top": []} for i in (1, 2, 3)]
    with_logprobs = [
        RequestOutput("l", delta_token_ids=[e["token_id"]], logprobs=entries[: i + 1], delta_logprobs=[e])
        for i, e in enumerate(entries)
    ]
    assert _merged(with_logprobs).delta_logprobs == entries
    single = RequestOutput("s", token_ids=[7], delta_token_ids=[7], delta_text="x")
    assert _merged([single]) is single and single.delta_token_ids == [7]


def test_concurrent_requests_each_get_their_own_answer(engine):
    prompts = mixed_prompts(n_images=(0, 1, 2, 3, 1, 2, 0, 3))
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)

    async def main():
        return await asyncio.gather(*(collect(engine, f"c{i}", p, sampling) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    alone = [asyncio.run(collect(engine, f"a{i}", p, sampling))[-1].token_ids for i, p in enumerate(prompts)]
    assert [r[-1].token_ids for r in results] == alone
    assert engine.stats().kv_bytes_used == 0


def test_one_step_wakes_a_loop_once_however_many_streams_it_advances(engine, monkeypatch):
    """The engine thread hands a step's outputs to an event loop in one thread-safe callback, not one per
    request; every stream still gets its deltas in order."""
    import zipvl_ray.engine.async_engine as async_engine

    prompts = mixed_prompts(n_images=(1, 2, 0, 3, 1, 2))
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    steps, batches = [], []
    step = engine.engine.step

    def counted_step():
        outputs = step()
        steps.append(len(outputs))
        return outputs

    monkeypatch.setattr(engine.engine, "step", counted_step)

    async def main():
        loop = asyncio.get_running_loop()
        original = loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            if callback is async_engine._put_all:
                batches.append(len(args[0]))
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting
        return await asyncio.gather(*(collect(engine, f"w{i}", p, sampling) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    for outs in results:
        assert outs[-1].finished and sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids
    # Every output came in a batch; a stream may merge outputs that queued behind a lagging loop.
    assert sum(batches) >= sum(len(outs) for outs in results)
    assert len(batches) <= len([n for n in steps if n]) < sum(batches)  # at most one wake-up per step
    assert max(batches) > 1


def test_closing_the_stream_aborts_and_frees_kv(engine):
    async def main():
        stream = engine.generate(
            "gone", mixed_prompts(n_images=(3,))[0], SamplingParams(max_tokens=500, ignore_eos=True)
        )
        seen = 0
        async for out in stream:
            seen += 1
            assert engine.stats().kv_bytes_used > 0 or out.finished
            if seen == 3:
                break
        await stream.aclose()
        return engine.stats()

    stats = asyncio.run(main())
    assert stats.kv_bytes_used == 0 and stats.num_running == 0


@pytest.mark.parametrize("hold_s", [0.0, 0.5])
def test_a_caller_cancelled_while_its_request_is_added_leaves_nothing_running(engine, hold_s):
    """The add runs in a worker thread that cancellation cannot stop (it may wait for the engine lock
    behind a long step): whether the add ran before or after the cancellation, no request is left
    decoding with nobody listening, and the id can be used again."""
    import threading
    import time

    prompt = mixed_prompts(n_images=(2,))[0]
    sampling = SamplingParams(max_tokens=1500, ignore_eos=True)

    async def consume():
        async for _ in engine.generate("cancelled-add", prompt, sampling):
            pass

    async def main():
        step = threading.Thread(
            target=lambda: (engine._lock.acquire(), time.sleep(hold_s), engine._lock.release())
        )
        step.start()  # a step holding the engine lock (hold_s 0: the add is not delayed)
        await asyncio.sleep(0.05)
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2 if hold_s else 0.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        step.join()

    asyncio.run(main())
    time.sleep(0.3)  # what a leaked request would spend decoding
    assert "cancelled-add" not in engine.engine.sequences
    assert engine.stats().kv_bytes_used == 0 and not engine._pending_adds
    outs = asyncio.run(
        collect(engine, "cancelled-add", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    )
    assert outs[-1].finished


def test_explicit_abort(engine):
    async def main():
        outs = []

        async def consume():
            async for out in engine.generate(
                "ab", mixed_prompts(n_images=(1,))[0], SamplingParams(max_tokens=500, ignore_eos=True)
            ):
                outs.append(out)

        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await engine.abort("ab")
        await asyncio.wait_for(task, 10)
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "abort"
    assert engine.stats().kv_bytes_used == 0


@pytest.mark.parametrize(
    ("prompt", "sampling", "zipvl", "message"),
    [
        ("", SamplingParams(), None, "empty"),
        (
            {
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}],
                "images": [],
            },
            SamplingParams(),
            None,
            "placeholder",
        ),
        ({"prompt": "x " * 3000}, SamplingParams(), None, "max_model_len"),
        ({"prompt": "hello"}, SamplingParams(max_tokens=5000), None, "max_model_len"),
        ({"prompt": "hello"}, SamplingParams(), {"tau": 1.5}, "tau"),
        ({"prompt": "hello"}, SamplingParams(), {"max_keep_ratio": -1}, "max_keep_ratio"),
        ({"nothing": 1}, SamplingParams(), None, "prompt"),
    ],
)
def test_bad_requests_raise_and_the_engine_keeps_serving(engine, prompt, sampling, zipvl, message):
    async def bad():
        async for _ in engine.generate("bad", prompt, sampling, zipvl):
            pass

    with pytest.raises(RequestError, match=message):
        asyncio.run(bad())
    ok = asyncio.run(
        collect(engine, "after-bad", {"prompt": "hello"}, SamplingParams(max_tokens=2, ignore_eos=True))
    )
    assert ok[-1].finished and len(ok[-1].token_ids) == 2
    assert engine.stats().kv_bytes_used == 0


def test_per_request_zipvl_override_dense_equals_tau_one(engine, tiny_llava):
    model, processor = tiny_llava
    prompt = mixed_prompts(n_images=(2,))[0]
    sampling = SamplingParams(max_tokens=8, ignore_eos=True)

    async def run(override):
        return [o async for o in engine.generate(f"o{override}", prompt, sampling, override)][-1]

    dense = asyncio.run(run({"tau": 1.0}))
    disabled = asyncio.run(run({"enabled": False}))
    pruned = asyncio.run(run({"max_keep_ratio": 0.3}))
    assert dense.token_ids == disabled.token_ids
    assert dense.metrics.kept_tokens_per_layer == [dense.metrics.prompt_tokens] * len(
        dense.metrics.kept_tokens_per_layer
    )
    assert pruned.metrics.kv_bytes < dense.metrics.kv_bytes


def test_steps_that_keep_failing_make_the_health_check_fail(tiny_llava, monkeypatch):
    """One failed step fails its requests and the replica stays healthy; a fault that fails every step
    (a sticky device error) fails the health check, so Serve replaces the replica; success resets it."""
    model, processor = tiny_llava
    core = LLMEngine(
        model, processor, zipvl=ZipVLConfig(tau=0.9), engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    eng = AsyncLLMEngine(core, unhealthy_after_failed_steps=2)
    real_step = core.step
    try:
        monkeypatch.setattr(core, "step", lambda: (_ for _ in ()).throw(RuntimeError("device lost")))
        prompt = mixed_prompts(n_images=(1,))[0]
        first = asyncio.run(collect(eng, "f1", prompt, SamplingParams(max_tokens=2)))
        assert first[-1].finish_reason == "error"
        eng.check_health()  # one failure: still healthy
        asyncio.run(collect(eng, "f2", prompt, SamplingParams(max_tokens=2)))
        with pytest.raises(RuntimeError, match="last 2 engine steps failed.*device lost"):
            eng.check_health()
        monkeypatch.setattr(core, "step", real_step)
        outs = asyncio.run(collect(eng, "ok", prompt, SamplingParams(max_tokens=2, ignore_eos=True)))
        assert outs[-1].finish_reason == "length"
        eng.check_health()
    finally:
        eng.shutdown()


def test_a_step_that_hangs_fails_the_health_check(tiny_llava, monkeypatch):
    """A step that never returns (a hung kernel or collective) holds the engine: every request on the
    replica stalls. The health check fails once it has run ``unhealthy_after_step_s``, so Serve replaces
    the replica; when the step returns, the replica is healthy again."""
    import threading

    model, processor = tiny_llava
    config = EngineConfig(kv_cache_bytes=8 << 20, unhealthy_after_step_s=0.5)
    core = LLMEngine(model, processor, zipvl=ZipVLConfig(tau=0.9), engine=config)
    eng = AsyncLLMEngine(core)
    real_step, release, entered = core.step, threading.Event(), threading.Event()

    def hung_step():
        entered.set()
        release.wait(30)
        return real_step()

    try:
        monkeypatch.setattr(core, "step", hung_step)
        prompt = mixed_prompts(n_images=(1,))[0]

        async def scenario():
            task = asyncio.ensure_future(collect(eng, "h1", prompt, SamplingParams(max_tokens=2)))
            await asyncio.to_thread(entered.wait, 30)
            eng.check_health()  # a step just started: healthy
            await asyncio.sleep(0.8)
            with pytest.raises(RuntimeError, match="engine step has run for .* hung"):
                eng.check_health()
            release.set()
            return await task

        outs = asyncio.run(scenario())
        assert outs[-1].finished
        eng.check_health()
    finally:
        release.set()
        eng.shutdown()


def test_an_id_is_free_again_once_its_closed_stream_has_aborted(engine):
    """A stream closed early keeps its id until its abort is done: a second stream with that id meanwhile
    is refused (its abort used to kill the newcomer's request, or its outputs leaked into the newcomer's
    stream); once ``aclose()`` returned, the id serves a new request normally."""
    long = SamplingParams(max_tokens=300, ignore_eos=True)
    short = SamplingParams(max_tokens=3, ignore_eos=True)
    prompt = mixed_prompts(n_images=(1,))[0]

    async def main():
        first = engine.generate("x", prompt, long)
        await anext(first)
        closing = asyncio.create_task(first.aclose())
        with pytest.raises(RequestError, match="already in use"):
            await collect(engine, "x", "Hi", short)  # concurrently with the close
        await closing
        after_close = await asyncio.wait_for(collect(engine, "x", "Hi", short), 60)

        # The close has started (its abort runs in a thread) when the newcomer arrives: the newcomer is
        # refused or, if the abort already finished, served; it used to be aborted silently and hang.
        second = engine.generate("y", prompt, long)
        await anext(second)
        closing = asyncio.create_task(second.aclose())
        await asyncio.sleep(0)
        try:
            racing = await asyncio.wait_for(collect(engine, "y", "Hi", short), 60)
        except RequestError:
            racing = None
        await closing
        return after_close, racing

    after_close, racing = asyncio.run(main())
    for outs in filter(None, (after_close, racing)):
        assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 3
        assert sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids
    assert engine.stats().kv_bytes_used == 0


def test_a_refused_duplicate_id_does_not_abort_the_request_that_holds_it(engine):
    from zipvl_ray.api.local import stream_with_abort

    sampling = SamplingParams(max_tokens=20, ignore_eos=True)

    async def main():
        original = stream_with_abort(engine, "dup", mixed_prompts()[0], sampling, None)
        outs = [await anext(original)]
        with pytest.raises(RequestError, match="already in use"):
            async for _ in stream_with_abort(engine, "dup", "Hi", sampling, None):
                pass
        outs += [o async for o in original]
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 20


def test_an_abort_never_overtakes_the_last_steps_delta(engine, monkeypatch):
    """The engine thread delivers a step's outputs after the step; an abort delivered from the event loop
    could reach the stream first and end it one delta short. Both now deliver under the engine lock."""
    import threading
    import time

    real = engine._deliver

    def slow(outputs):  # widen the window between a step and its delivery
        if threading.current_thread() is engine._thread:
            time.sleep(0.01)
        real(outputs)

    monkeypatch.setattr(engine, "_deliver", slow)

    async def trial(i):
        outs = []

        async def consume():
            async for out in engine.generate(f"ab{i}", mixed_prompts()[0], SamplingParams(max_tokens=200)):
                outs.append(out)

        task = asyncio.create_task(consume())
        while len(outs) < 1 + i % 3:
            await asyncio.sleep(0)
        await engine.abort(f"ab{i}")
        await asyncio.wait_for(task, 30)
        return outs

    for i in range(6):
        outs = asyncio.run(trial(i))
        assert outs[-1].finish_reason == "abort"
        assert sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids


def test_an_abort_before_the_add_runs_ends_the_stream_without_running_it(engine):
    async def main():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        entry = (loop, queue)
        engine._streams["early"] = entry
        engine._pending_adds["early"] = (0.0, entry)
        try:
            await engine.abort("early")
            engine._add(
                "early", entry, "Hi", SamplingParams(max_tokens=4), None, 0.0
            )  # the late add: skipped
            return await asyncio.wait_for(queue.get(), 5)
        finally:
            engine._streams.pop("early", None)

    before = engine.stats()
    out = asyncio.run(main())
    assert out.finished and out.finish_reason == "abort"
    assert "early" not in engine.engine.sequences and engine.stats().num_waiting == 0
    # counted as an abort of a waiting request (it was not counted at all)
    assert engine.stats().num_aborted == before.num_aborted + 1
    assert engine.stats().num_aborted_waiting == before.num_aborted_waiting + 1


def test_a_second_cancellation_does_not_free_the_id_before_the_abort_ran(engine, monkeypatch):
    """The consumer is cancelled while its stream's abort waits for the engine: cancelled again, it leaves,
    but the id stays taken until the abort has run (a newcomer got the old request's deltas, then was
    aborted silently and hung)."""
    import contextlib
    import threading
    import time

    started, release = threading.Event(), threading.Event()
    real = engine._abort_locked

    def slow_abort(request_id, *, deliver=False):
        started.set()
        release.wait(10)
        return real(request_id, deliver=deliver)

    monkeypatch.setattr(engine, "_abort_locked", slow_abort)

    async def main():
        first = asyncio.Event()

        async def consume():
            async with contextlib.aclosing(
                engine.generate("dc", mixed_prompts()[0], SamplingParams(max_tokens=300, ignore_eos=True))
            ) as stream:
                async for _ in stream:
                    first.set()
                    await asyncio.sleep(3600)

        task = asyncio.create_task(consume())
        await first.wait()
        task.cancel()
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # again, while the abort waits
        with contextlib.suppress(asyncio.CancelledError):
            await task
        still_taken = "dc" in engine._streams
        with pytest.raises(RequestError, match="already in use"):
            await collect(engine, "dc", "Hi", SamplingParams(max_tokens=2))
        release.set()
        for _ in range(500):
            if "dc" not in engine._streams:
                break
            await asyncio.sleep(0.01)
        monkeypatch.setattr(engine, "_abort_locked", real)
        outs = await asyncio.wait_for(
            collect(engine, "dc", "Hi", SamplingParams(max_tokens=2, ignore_eos=True)), 30
        )
        return still_taken, outs

    still_taken, outs = asyncio.run(main())
    assert still_taken and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 2
    time.sleep(0.05)
    assert engine.stats().kv_bytes_used == 0


def test_the_engine_lock_is_handed_to_waiting_threads():
    """threading.Lock is not fair: a loop that releases and retakes it (the engine thread, step after step)
    starves a thread waiting for it (an add, an abort). The engine thread hands it over between steps."""
    import threading
    import time

    from zipvl_ray.engine.async_engine import HandoffLock

    lock, stop = HandoffLock(), threading.Event()

    def engine_loop():
        while not stop.is_set():
            with lock:  # a 2 ms step that holds the GIL (a step that sleeps lets the waiter in anyway)
                end = time.perf_counter() + 0.002
                while time.perf_counter() < end:
                    pass
            lock.yield_to_waiters()

    thread = threading.Thread(target=engine_loop)
    thread.start()
    time.sleep(0.02)
    waits = []
    for _ in range(20):
        start = time.monotonic()
        with lock:
            waits.append(time.monotonic() - start)
    stop.set()
    thread.join()
    # Handed over, the 20 waits add up to about one step (2 ms); without the handoff they added up to
    # 0.09-7.9 s in six runs here.
    assert sum(waits) < 0.05, waits


@pytest.mark.parametrize("fault", ["append", "output"])
def test_a_failed_step_still_answers_what_finished_before_the_failing_row(tiny_llava, monkeypatch, fault):
    """Row ``a`` finishes in a prefill step, then row ``b`` raises (in sampling's bookkeeping, or while its
    output is built): ``a``'s answer was only in the step's local list, and its stream used to hang.
    ``fail_step`` answers ``a`` as it finished, fails ``b`` (with a bare output when its output cannot be
    built) and frees every block."""
    model, processor = tiny_llava
    core = LLMEngine(
        model, processor, zipvl=ZipVLConfig(tau=0.9), engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    prompt = mixed_prompts(n_images=(1,))[0]
    core.add_request("a", prompt, SamplingParams(max_tokens=1, ignore_eos=True))
    core.add_request("b", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    name = "_append_token" if fault == "append" else "_output"
    real = getattr(core, name)

    def faulty(seq, *args):
        if seq.request_id == "b":
            raise RuntimeError("a bug in one row")
        return real(seq, *args)

    monkeypatch.setattr(core, name, faulty)
    with pytest.raises(RuntimeError, match="a bug in one row") as info:
        core.step()
    # One step, and it raised in row b: so both rows were in it.
    outputs = {o.request_id: o for o in core.fail_step(info.value)}
    assert set(outputs) == {"a", "b"}
    assert (
        outputs["a"].finished and outputs["a"].finish_reason == "length" and len(outputs["a"].token_ids) == 1
    )
    assert outputs["b"].finished and outputs["b"].finish_reason == "error"
    assert outputs["b"].error == "internal engine error: RuntimeError"
    assert not core.sequences and not core.has_unfinished() and core.runner.kv.used_bytes == 0
    core.runner.kv.check_consistency()


def test_stats_time_stops_at_the_oldest_add_still_waiting_for_the_engine(engine):
    """A request accepted while a step runs waits for the engine before it is added, and the snapshot
    lacks it until then: ``stats_time`` says so (a router took a snapshot stamped at read time as holding
    a request it did not hold, and dropped that request's reservation)."""
    import time

    prompt = mixed_prompts(n_images=(1,))[0]
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)

    async def main():
        assert abs(engine.stats_time() - time.time()) < 1.0  # nothing waiting: current
        with engine._lock:  # a long step holds the engine
            accepted = time.time()
            stream = engine.generate("late", prompt, sampling)
            first = asyncio.ensure_future(anext(stream))
            await asyncio.sleep(0.3)
            during, read_at = engine.stats_time(), time.time()
            waiting_in_snapshot = engine.stats().num_waiting + engine.stats().num_running
        await first
        outs = [out async for out in stream]
        return accepted, during, read_at, waiting_in_snapshot, outs

    accepted, during, read_at, in_snapshot, outs = asyncio.run(main())
    assert accepted <= during < read_at - 0.1 and in_snapshot == 0  # the acceptance, not the read
    assert outs[-1].finished and time.time() - engine.stats_time() < 1.0


@pytest.mark.parametrize("how", ["fault_outside_a_step", "shutdown"])
def test_a_stopped_engine_thread_ends_every_stream_and_refuses_new_requests(tiny_llava, monkeypatch, how):
    """The engine thread can end two ways: an error outside a step (``stats()`` or ``fail_step``, which
    the step's own handler does not cover) or :meth:`shutdown`. Either way every open stream ends with an
    ``"error"`` output (it used to wait forever for a step that never came), the KV is freed, a new
    request is refused with :class:`EngineDeadError` at once, and the health check says why."""
    import threading

    from zipvl_ray.engine import EngineDeadError

    model, processor = tiny_llava
    core = LLMEngine(
        model, processor, zipvl=ZipVLConfig(tau=0.9), engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    eng = AsyncLLMEngine(core)
    prompt = mixed_prompts(n_images=(1,))[0]
    stepped = threading.Event()
    real_step, real_stats = core.step, core.stats

    def step():
        outputs = real_step()
        snapshot = real_stats()
        if snapshot.num_running + snapshot.num_waiting == 2:  # both streams added: the fault may come
            stepped.set()
        return outputs

    def stats():
        # Only on the engine thread: an add's own snapshot (an add that came after the first step) must
        # not be what fails, as it did once in CI.
        if how == "fault_outside_a_step" and stepped.is_set() and threading.current_thread() is eng._thread:
            raise MemoryError("snapshot failed")
        return real_stats()

    monkeypatch.setattr(core, "step", step)
    monkeypatch.setattr(core, "stats", stats)

    async def scenario():
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        tasks = [asyncio.ensure_future(collect(eng, f"s{i}", prompt, long)) for i in range(2)]
        await asyncio.to_thread(stepped.wait, 30)
        if how == "shutdown":
            await asyncio.to_thread(eng.shutdown)
        return await asyncio.wait_for(asyncio.gather(*tasks), 30)

    try:
        streams = asyncio.run(scenario())
        for outs in streams:
            assert outs[-1].finished and outs[-1].finish_reason == "error"
            assert "the engine stopped" in outs[-1].error
        assert real_stats().kv_bytes_used == 0 and not core.has_unfinished()
        with pytest.raises(EngineDeadError, match="not running"):
            asyncio.run(collect(eng, "late", prompt, SamplingParams(max_tokens=2)))
        with pytest.raises(RuntimeError, match="snapshot failed" if how != "shutdown" else "shut down"):
            eng.check_health()
    finally:
        eng.shutdown()


@pytest.mark.parametrize("width_delta", [-1, 1])
def test_image_features_of_the_wrong_width_fail_their_own_request_only(engine, width_delta):
    """A feature one column too narrow used to fail the step's embedding, and with it every request in
    flight (and count toward the health check); one too wide was read misaligned. Both are refused at the
    add (400) while a running request goes on."""
    import torch

    from zipvl_ray.engine import EncodedPrompt
    from zipvl_ray.vision import ImageFeatures

    core = engine.engine
    image_id = core.runner.adapter.image_token_id
    hidden = core.runner.adapter.language_model.embed_tokens.embedding_dim
    text = [5 + i % 50 for i in range(12)]
    bad = ImageFeatures(embeds=torch.zeros(4, hidden + width_delta), num_tokens=4, content_hash="bad")

    async def scenario():
        good = asyncio.ensure_future(
            collect(engine, "good", EncodedPrompt(text, []), SamplingParams(max_tokens=40, ignore_eos=True))
        )
        await asyncio.sleep(0.05)
        with pytest.raises(RequestError, match=rf"features have shape \(4, {hidden + width_delta}\)"):
            await collect(
                engine, "bad", EncodedPrompt(text + [image_id] * 4, [bad]), SamplingParams(max_tokens=2)
            )
        return await good

    outs = asyncio.run(scenario())
    assert outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 40
    assert engine.consecutive_failed_steps == 0 and engine.stats().kv_bytes_used == 0


def test_closing_a_stream_on_its_final_output_sends_no_abort(engine, monkeypatch):
    """``stream_with_abort`` closes the stream as soon as it has the final output. The stream used to take
    that close for a client leaving early and abort the finished request in a worker thread, behind the
    running step: every request's handler ended a step late (a review measured 0.4 s)."""
    from zipvl_ray.api.local import stream_with_abort

    core = engine.engine
    aborts: list[str] = []
    real_abort = core.abort_request
    monkeypatch.setattr(core, "abort_request", lambda rid: aborts.append(rid) or real_abort(rid))

    async def consume():
        sampling = SamplingParams(max_tokens=3, ignore_eos=True)
        return [out async for out in stream_with_abort(engine, "fin", {"prompt": "hello"}, sampling, None)]

    outs = asyncio.run(consume())
    assert outs[-1].finished and aborts == []


def test_a_withdrawn_add_never_runs_under_the_ids_next_stream(engine, monkeypatch):
    """A caller cancelled while its add waits for the engine lock gives its id back; a new stream may take
    it at once. The old add, arriving late, used to find the new stream's pending entry and queue the *old*
    prompt under it (and the new one's own add was skipped)."""
    import threading
    import time

    real_add = engine._add
    slow = threading.Event()

    def add(request_id, entry, prompt, *rest):
        if prompt == {"prompt": "old"}:
            slow.wait(5)  # the old call's worker thread reaches the lock late
        return real_add(request_id, entry, prompt, *rest)

    monkeypatch.setattr(engine, "_add", add)

    async def scenario():
        old = asyncio.ensure_future(
            collect(engine, "X", {"prompt": "old"}, SamplingParams(max_tokens=2, ignore_eos=True))
        )
        await asyncio.sleep(0.05)
        old.cancel()
        with pytest.raises(asyncio.CancelledError):
            await old
        new = asyncio.ensure_future(
            collect(
                engine,
                "X",
                {"prompt": "a much longer new prompt"},
                SamplingParams(max_tokens=5, ignore_eos=True),
            )
        )
        await asyncio.sleep(0.05)
        slow.set()  # the old add runs now, while the new stream holds the id
        await asyncio.sleep(0.1)
        return await asyncio.wait_for(new, 30)

    outs = asyncio.run(scenario())
    monkeypatch.undo()
    alone = asyncio.run(
        collect(engine, "alone", {"prompt": "a much longer new prompt"}, SamplingParams(max_tokens=1))
    )
    assert len(outs[-1].token_ids) == 5  # the new request's max_tokens, not the old one's 2
    assert outs[-1].metrics.prompt_tokens == alone[-1].metrics.prompt_tokens  # and its prompt
    time.sleep(0.05)
    assert engine.stats().kv_bytes_used == 0 and not engine.engine.has_unfinished()


def test_finished_and_aborted_sequences_are_not_kept_between_steps(tiny_llava):
    """The engine keeps what a step built (for ``fail_step``) only while the step runs: a finished or
    aborted sequence, with its image features, used to stay referenced until the next step, i.e. for as long
    as the engine stayed idle."""
    import gc
    import weakref

    model, processor = tiny_llava
    core = LLMEngine(
        model, processor, zipvl=ZipVLConfig(tau=0.9), engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    prompt = mixed_prompts(n_images=(1,))[0]
    core.add_request("done", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    core.add_request("aborted", prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    refs = {rid: weakref.ref(core.sequences[rid]) for rid in ("done", "aborted")}
    while "done" in core.sequences:
        core.step()
    core.abort_request("aborted")
    gc.collect()
    assert refs["done"]() is None and refs["aborted"]() is None
    assert core._step_outputs == [] and core._step_finished == []


def test_stats_time_never_passes_a_request_whose_add_has_not_reached_the_snapshot(engine, monkeypatch):
    """The router takes a snapshot stamped after a request's routing as counting it. The pending add used
    to be dropped before the engine had the request and before the snapshot was retaken, so for the length
    of the add the stamp said "now" while the snapshot lacked the request."""
    import threading
    import time

    core = engine.engine
    inside, release = threading.Event(), threading.Event()
    real_add = core.add_request

    def slow_add(*args, **kwargs):
        inside.set()
        release.wait(5)
        return real_add(*args, **kwargs)

    monkeypatch.setattr(core, "add_request", slow_add)

    async def scenario():
        accepted = time.time()
        task = asyncio.ensure_future(
            collect(engine, "stamp", {"prompt": "hello"}, SamplingParams(max_tokens=30, ignore_eos=True))
        )
        await asyncio.to_thread(inside.wait, 5)
        await asyncio.sleep(0.05)
        during = engine.stats_time(), engine.stats().num_waiting + engine.stats().num_running
        release.set()
        await task
        return accepted, during

    accepted, (stamp, counted) = asyncio.run(scenario())
    assert counted == 0 and stamp <= accepted + 0.01  # not in the snapshot yet: the stamp stays at acceptance
