"""Continuous batching over ragged, evicting KV caches.

Each step is either a prefill of newly admitted prompts or one decode step of every running
sequence (prefill first, as nano-vllm does). Admission is by *predicted* footprint: a prompt of ``n``
tokens is expected to keep ``n x f_l`` tokens in layer ``l`` (``f_l`` the running mean kept fraction)
plus decode headroom, block-rounded (:func:`zipvl_ray.routing.footprint.predict_bytes`). Predictions
can be wrong; when the pool runs out the newest running sequence is preempted (its blocks freed, the
request requeued at the front for recomputation) instead of failing anything.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np

from zipvl_ray.config import EngineConfig
from zipvl_ray.engine.sequence import Sequence, SequenceStatus
from zipvl_ray.kv import KVCacheManager


class Scheduler:
    """Waiting and running queues, admission and preemption.

    Parameters
    ----------
    config : EngineConfig
        ``max_num_seqs`` and ``max_num_batched_tokens`` bound every step.
    kv : KVCacheManager
    predict_bytes : callable
        ``predict_bytes(seq, decode_tokens) -> int``: bytes ``seq`` will hold after prefill plus
        ``decode_tokens`` generated tokens.
    """

    def __init__(
        self, config: EngineConfig, kv: KVCacheManager, predict_bytes: Callable[[Sequence, int], int]
    ):
        self.config = config
        self.kv = kv
        self.predict_bytes = predict_bytes
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefill_cap: int | None = None  # set to 1 after a batch did not fit
        self.prefills_in_a_row = 0  # prefill steps since the running sequences last decoded

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def headroom(self, seq: Sequence) -> int:
        """Decode tokens reserved for ``seq``: its replay backlog after a preemption (tokens it already
        generated and feeds back) plus ``min(tokens still to generate, decode_headroom_tokens)``.

        Without the backlog a preempted sequence is readmitted as if it were new, does not fit once its
        generated tokens are replayed, and is preempted again (thrashing under KV pressure).
        """
        return seq.replay_backlog() + max(0, min(seq.remaining_tokens(), self.config.decode_headroom_tokens))

    def reserved_bytes(self) -> int:
        """Bytes running sequences are expected to add within their headroom (beyond what they hold)."""
        held = [(self.kv.seqs.get(seq.request_id), seq) for seq in self.running]
        held = [(kv, seq) for kv, seq in held if kv is not None]
        if not held:
            return 0
        bs = self.kv.block_size
        # One array over (sequence, layer), not a Python loop: this runs at every step (admission and the
        # stats snapshot). A layer of L tokens in ceil(L / bs) blocks needs ceil((L + g) / bs) after g more.
        lengths = np.array([kv.lengths for kv, _ in held], dtype=np.int64)
        growth = np.array([self.headroom(seq) for _, seq in held], dtype=np.int64)[:, None]
        blocks = -(-(lengths + growth) // bs) - -(-lengths // bs)
        return int(blocks.sum()) * self.kv.layout.block_bytes

    # -- the step ------------------------------------------------------------------------------------
    def schedule(self) -> tuple[str, list[Sequence]] | None:
        """The next step: ``("prefill", seqs)``, ``("decode", seqs)``, or None when idle.

        Prefill first, but at most ``max_prefills_between_decodes`` in a row while sequences run.
        """
        due = self.running and self.prefills_in_a_row >= self.config.max_prefills_between_decodes
        batch = [] if due else self._admit()
        if batch:
            self.prefills_in_a_row += int(bool(self.running))
            return "prefill", batch
        self.prefills_in_a_row = 0
        if not self.running:
            return None
        return "decode", self.running[: self.config.max_num_seqs]

    def _admit(self) -> list[Sequence]:
        batch: list[Sequence] = []
        if not self.waiting:
            self.prefill_cap = None
            return batch
        tokens = 0
        capacity = self.kv.capacity_bytes
        if self.running and self.kv.used_bytes + self.predict_bytes(self.waiting[0], 0) > capacity:
            # Cannot fit even with no headroom reserved for anyone: skip the reservation sum (a loop over
            # every running sequence and layer), which a saturated engine would pay at every step.
            self.prefill_cap = None
            return batch
        committed = self.kv.used_bytes + self.reserved_bytes()
        cap = self.prefill_cap or self.config.max_num_seqs
        while self.waiting and len(self.running) + len(batch) < self.config.max_num_seqs and len(batch) < cap:
            seq = self.waiting[0]
            n = seq.num_prompt_tokens
            if batch and tokens + n > self.config.max_num_batched_tokens:
                break
            need = self.predict_bytes(seq, self.headroom(seq))
            if committed + need > capacity and (batch or self.running):
                break  # wait for memory; an idle engine still tries (the prediction may be pessimistic)
            self.waiting.popleft()
            batch.append(seq)
            tokens += n
            committed += need
        self.prefill_cap = None
        return batch

    def start(self, seqs: list[Sequence]) -> None:
        """Mark prefilled ``seqs`` as running."""
        for seq in seqs:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def requeue(self, seqs: list[Sequence], *, cap_next_prefill: bool = False) -> None:
        """Put ``seqs`` back at the front of the waiting queue, in order (a prefill that did not fit)."""
        for seq in reversed(seqs):
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
        if cap_next_prefill:
            self.prefill_cap = 1

    def preempt_newest(self, protect: list[Sequence] | None = None) -> Sequence | None:
        """Free the most recently admitted running sequence (not in ``protect``) and requeue it."""
        protect = protect or []
        for seq in reversed(self.running):
            if seq not in protect:
                self.running.remove(seq)
                self.kv.free(seq.request_id)
                seq.status = SequenceStatus.WAITING
                seq.num_fed = 0
                seq.metrics.num_preemptions += 1
                self.waiting.appendleft(seq)
                self.num_preemptions += 1
                return seq
        return None

    def ensure_decode_room(self) -> list[Sequence]:
        """Preempt the newest running sequences until one decode step of the rest fits in the pool.

        Returns the sequences that cannot run at all (alone and still too big for the pool).
        """
        hopeless: list[Sequence] = []
        while self.running:
            ids = [s.request_id for s in self.running[: self.config.max_num_seqs]]
            if self.kv.can_append(ids):
                break
            if len(self.running) == 1:
                hopeless.append(self.running.pop())
                break
            self.preempt_newest()
        return hopeless
