"""``AsyncLLMEngine``: the engine core in a background thread, streaming outputs to asyncio callers.

The engine thread runs :meth:`LLMEngine.step` in a loop while there is work and sleeps otherwise;
callers add requests, abort them and read stats from any event loop. Torch releases the GIL in its
kernels, so the serving event loop stays responsive while a step runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.llm_engine import LLMEngine, PromptLike
from zipvl_ray.engine.types import EngineDeadError, EngineStats, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class HandoffLock:
    """A lock whose holder can hand it to the threads waiting for it.

    ``threading.Lock`` is not fair: the engine thread, releasing it after a step and taking it again for
    the next, would win nearly every time, and an add or an abort could wait until the engine is idle.
    After each step the engine thread calls :meth:`yield_to_waiters`, which returns once every thread that
    was waiting has taken the lock (or after ``timeout_s``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self._waiting = 0

    def acquire(self) -> bool:
        with self._count:
            self._waiting += 1
        try:
            return self._lock.acquire()
        finally:
            with self._count:
                self._waiting -= 1

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> HandoffLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def yield_to_waiters(self, timeout_s: float = 0.05) -> None:
        deadline = time.monotonic() + timeout_s
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0001)


def _merged(outputs: list[RequestOutput]) -> RequestOutput:
    """The last of ``outputs`` (the newest cumulative state) carrying every output's delta, in order.

    One join over the backlog: concatenating pairwise would copy the deltas O(k^2) times over k outputs.
    """
    last = outputs[-1]
    if len(outputs) > 1:
        last.delta_token_ids = [t for out in outputs for t in out.delta_token_ids]
        last.delta_text = "".join(out.delta_text for out in outputs)
        if last.delta_logprobs is not None:
            last.delta_logprobs = [lp for out in outputs for lp in out.delta_logprobs or ()]
    return last


class AsyncLLMEngine:
    """Asynchronous front of :class:`LLMEngine`.

    A stream closed or cancelled before its final output aborts its request itself
    (``aborts_on_close``): callers need not call :meth:`abort` as well.

    Parameters
    ----------
    engine : LLMEngine
        The engine core; owned by this object's thread from now on.
    unhealthy_after_failed_steps : int
        :meth:`check_health` fails once this many engine steps in a row have raised (a persistent fault,
        such as a sticky CUDA error, that fails every request), so that Serve replaces the replica; a
        successful step resets the count.
    """

    #: Closing or cancelling a :meth:`generate` stream aborts its request (see ``stream_with_abort``).
    aborts_on_close = True

    def __init__(self, engine: LLMEngine, *, unhealthy_after_failed_steps: int = 3):
        self.engine = engine
        self.unhealthy_after_failed_steps = unhealthy_after_failed_steps
        self.consecutive_failed_steps = 0
        self.last_step_error: str | None = None
        self.step_started: float | None = None  # time.monotonic() of the running step's start
        self._lock = HandoffLock()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # generate() calls whose add has not run yet: the wall time each was accepted, and the call's stream
        # entry (a withdrawn call's late add must not take the id's next stream's place)
        self._pending_adds: dict[str, tuple[float, tuple]] = {}
        self._stats = engine.stats()
        self._stopped = False
        self._fatal: str | None = None  # why the engine thread stopped, when it did on an error
        self._thread = threading.Thread(target=self._run, name="zipvl-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype=None,
        device=None,
        zipvl: ZipVLConfig | None = None,
        engine: EngineConfig | None = None,
        load_vision: bool = False,
    ) -> AsyncLLMEngine:
        """Load ``model`` and start the engine thread. ``load_vision=False`` drops the vision tower (the
        LLM stage of a split deployment receives precomputed image features)."""
        core = LLMEngine.from_pretrained(
            model, dtype=dtype, device=device, zipvl=zipvl, engine=engine, load_vision=load_vision
        )
        return cls(core)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def processor(self):
        return self.engine.processor

    # -- requests ------------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt: PromptLike,
        sampling: SamplingParams | None = None,
        zipvl: dict[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request (deltas in ``delta_token_ids`` / ``delta_text``).

        Raises :class:`~zipvl_ray.engine.types.RequestError` before yielding for a bad request. Closing
        the iterator early (a client that went away) aborts the request and frees its KV.

        ``request_id`` must be unique among live requests: it is in use from this call until the
        stream has ended, or been closed and its abort has finished (``aclose()`` returns then); a second
        stream with the same id meanwhile is refused.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._check_running()
        if request_id in self._streams:
            from zipvl_ray.engine.types import RequestError

            raise RequestError(f"request id {request_id!r} is already in use")
        entry = (loop, queue)
        self._streams[request_id] = entry
        self._pending_adds[request_id] = (time.time(), entry)
        arrival = time.perf_counter()
        try:
            await asyncio.to_thread(self._add, request_id, entry, prompt, sampling, zipvl, arrival)
        except BaseException:
            # The worker thread cannot be interrupted: a caller cancelled while the add waits for the lock
            # (behind a long step) or encodes images must still leave nothing running.
            await self._release_after(asyncio.to_thread(self._withdraw, request_id, entry), request_id, entry)
            raise
        finished = False
        try:
            while True:
                backlog = [await queue.get()]
                while not backlog[-1].finished and not queue.empty():
                    # Outputs that arrived while the consumer was busy go out as one (as vLLM's output
                    # collector merges them): the deltas concatenated, the latest cumulative state. A
                    # consumer slower than the engine (a loaded ingress, a slow client) then pays its
                    # per-item cost (a Ray streaming item, an SSE event) once per batch of tokens.
                    backlog.append(queue.get_nowait())
                out = _merged(backlog)
                # Before the yield: a consumer that closes the stream on its final output (as
                # ``stream_with_abort`` does) must not send an abort for a request that has ended.
                finished = out.finished
                yield out
                if finished:
                    break
        finally:
            if finished:
                self._unregister(request_id, entry)
            else:  # the id stays registered until the abort is done: no new stream takes it
                await self._release_after(
                    asyncio.to_thread(self._abort_locked, request_id), request_id, entry
                )

    async def _release_after(self, cleanup, request_id: str, entry: tuple) -> None:
        """Run ``cleanup`` (a withdraw or an abort) to its end even if the caller is cancelled again, and
        only then free ``request_id`` for a new stream."""
        task = asyncio.ensure_future(cleanup)
        task.add_done_callback(lambda _: self._unregister(request_id, entry))
        await asyncio.shield(task)

    def _unregister(self, request_id: str, entry: tuple) -> None:
        if self._streams.get(request_id) is entry:
            del self._streams[request_id]

    def _check_running(self) -> None:
        if self._fatal is not None:
            raise EngineDeadError(f"the engine is not running: {self._fatal}")
        if self._stopped or not self._thread.is_alive():
            raise EngineDeadError("the engine has been shut down")

    def _add(self, request_id, entry, prompt, sampling, zipvl, arrival) -> None:
        with self._lock:
            pending = self._pending_adds.get(request_id)
            if pending is None or pending[1] is not entry:  # withdrawn while this thread waited for the lock
                return
            try:
                # Under the lock: either the engine thread's failure (which takes it too) has not begun,
                # and it will end this stream, or it has ended, and this add is refused; never an add that
                # nobody steps.
                self._check_running()
                self.engine.add_request(request_id, prompt, sampling, zipvl, arrival_time=arrival)
                self._stats = self.engine.stats()
            finally:  # after the snapshot: stats_time() never passes this acceptance before the snapshot has it
                self._pending_adds.pop(request_id, None)
        self._wakeup.set()

    def _withdraw(self, request_id: str, entry: tuple) -> None:
        """Undo a cancelled :meth:`generate`'s add, whichever way the race with :meth:`_add` went."""
        with self._lock:
            pending = self._pending_adds.get(request_id)
            if pending is not None and pending[1] is entry:  # not added yet: ``_add`` will skip it
                del self._pending_adds[request_id]
                self._count_withdrawn()
                return
        self._abort_locked(request_id)  # added already (or failed, then this finds nothing)

    def _abort_locked(self, request_id: str, *, deliver: bool = False) -> RequestOutput | None:
        with self._lock:
            if deliver and request_id in self._pending_adds:  # aborted before its add ran: never add it
                self._pending_adds.pop(request_id, None)
                self._count_withdrawn()
                out = RequestOutput(request_id=request_id, finished=True, finish_reason="abort")
            else:
                out = self.engine.abort_request(request_id)
                self._stats = self.engine.stats()
            if deliver and out is not None:
                # Under the lock, so after every output of the steps before it (the engine thread
                # delivers those under the lock too): the stream never ends before its last delta.
                self._deliver([out])
        return out

    def _count_withdrawn(self) -> None:  # under the lock
        count = getattr(self.engine, "count_withdrawn", None)
        if count is not None:
            count()
            self._stats = self.engine.stats()

    async def abort(self, request_id: str) -> None:
        """Abort ``request_id``; returns once its KV blocks are back in the pool. Its stream (if any)
        ends with a finished output whose ``finish_reason`` is ``"abort"``."""
        await asyncio.to_thread(self._abort_locked, request_id, deliver=True)

    def check_health(self) -> None:
        """Raise if the engine thread is gone, its steps keep failing, or one step has run longer than
        ``EngineConfig.unhealthy_after_step_s`` (Serve then restarts the replica)."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine thread is not running: {self._fatal}")
        if self._stopped or not self._thread.is_alive():
            raise RuntimeError("the engine thread is not running")
        limit = getattr(self.engine.config, "unhealthy_after_step_s", None)
        started = self.step_started
        if limit is not None and started is not None and time.monotonic() - started > limit:
            raise RuntimeError(
                f"an engine step has run for {time.monotonic() - started:.0f} s (limit {limit:g} s): hung"
            )
        if self.consecutive_failed_steps >= self.unhealthy_after_failed_steps:
            raise RuntimeError(
                f"the last {self.consecutive_failed_steps} engine steps failed (last: {self.last_step_error})"
            )

    def stats(self) -> EngineStats:
        """The latest snapshot (taken after every step, add and abort): never waits for a step."""
        return self._stats

    def stats_time(self) -> float:
        """Wall time up to which :meth:`stats` contains every request this engine accepted.

        The snapshot is retaken whenever a request is added or aborted, so it contains every added request;
        what it lacks are the requests accepted by :meth:`generate` whose add still waits for the engine
        (behind a long step). So: the acceptance time of the oldest of those, else now. A router that
        reads a snapshot stamped later than a request's routing would take the request as counted in it.
        """
        now = time.time()
        return min((accepted for accepted, _ in list(self._pending_adds.values())), default=now)

    # -- the engine thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - outside a step (fail_step, stats): the thread cannot go on
            logger.exception("the engine thread stopped on an unexpected error")
            self._fail_streams(f"{type(exc).__name__}: {exc}"[:200], exc)

    def _fail_streams(self, reason: str, exc: BaseException | None = None) -> None:
        """The engine thread is ending: refuse new adds, free what the engine still holds (best effort), and
        end every open stream with an ``"error"`` output, so that no caller waits for a step that will
        never run."""
        with self._lock:
            self._fatal = reason
            error = f"the engine stopped: {reason}"
            outputs: list[RequestOutput] = []
            with contextlib.suppress(Exception):  # the engine may be what broke: its KV goes with the replica
                outputs = self.engine.fail_step(exc or RuntimeError(reason))
            with contextlib.suppress(Exception):
                self._stats = self.engine.stats()
            for out in outputs:
                if out.finish_reason == "error":
                    out.error = error
            ended = {out.request_id for out in outputs if out.finished}
            outputs += [
                RequestOutput(request_id=request_id, finished=True, finish_reason="error", error=error)
                for request_id in list(self._streams)
                if request_id not in ended
            ]
            self._deliver(outputs)

    def _loop(self) -> None:
        while not self._stopped:
            outputs: list[RequestOutput] = []
            with self._lock:
                busy = self.engine.has_unfinished()
                if busy:
                    self.step_started = time.monotonic()
                    try:
                        outputs = self.engine.step()
                        self.consecutive_failed_steps = 0
                    except Exception as exc:  # a bug must not take the replica down: fail what is in flight
                        logger.exception("engine step failed; aborting in-flight requests")
                        self.consecutive_failed_steps += 1
                        self.last_step_error = f"{type(exc).__name__}: {exc}"[:200]
                        outputs = self.engine.fail_step(exc)
                    finally:
                        self.step_started = None
                    self._stats = self.engine.stats()
                if outputs:  # under the lock: an abort's final output never overtakes a step's
                    self._deliver(outputs)
            self._lock.yield_to_waiters()  # adds and aborts get their turn between two steps
            if not busy:
                self._wakeup.wait(timeout=0.5)
                self._wakeup.clear()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand ``outputs`` to their streams: one thread-safe callback per event loop, not per output (a
        step over many streamed requests would otherwise wake the serving loop once per request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            target = self._streams.get(out.request_id)
            if target is not None:
                loop, queue = target
                by_loop.setdefault(loop, []).append((queue, out))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(_put_all, items)

    def shutdown(self) -> None:
        """Stop the engine thread. In-flight requests end with an ``"error"`` output; later ones are refused
        with :class:`EngineDeadError`."""
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        if self._fatal is None:
            self._fail_streams("the engine was shut down")


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:  # in step order: a stream's outputs keep their order
        queue.put_nowait(out)
