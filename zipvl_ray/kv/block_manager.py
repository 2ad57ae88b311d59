"""Block-granular allocation with one block table per sequence AND per layer.

After ZipVL prefill, layer ``l`` of a sequence holds ``kept_l`` tokens in ``ceil(kept_l / block_size)``
blocks; decode appends one token to every layer. The Python lists in :class:`SequenceKV` are the
truth; the device tensor ``block_tables[layer, row, i]`` mirrors them for the attention kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from zipvl_ray.kv.pool import KVLayout


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than an allocation needs."""


class BlockAllocator:
    """A free list of block ids."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free of {self.num_blocks}")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


@dataclass
class SequenceKV:
    """Where one sequence's tokens live.

    Attributes
    ----------
    row : int
        Row of this sequence in the device block tables.
    tables : list[list[int]]
        Per layer, its block ids in order.
    lengths : list[int]
        Per layer, tokens held.
    """

    row: int
    tables: list[list[int]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    @property
    def num_blocks(self) -> int:
        return sum(len(t) for t in self.tables)


class KVCacheManager:
    """Allocates pool blocks to (sequence, layer) pairs and keeps the block tables.

    Parameters
    ----------
    layout : KVLayout
    num_blocks : int
        Pool size in blocks.
    max_num_seqs : int
        Rows of the device block tables (sequences held at once).
    max_model_len : int
        Longest sequence, sizing the rows.
    device : torch.device
        Where the block tables live (the pool's device).
    """

    def __init__(
        self, layout: KVLayout, num_blocks: int, max_num_seqs: int, max_model_len: int, device="cpu"
    ):
        self.layout = layout
        self.block_size = layout.block_size
        self.allocator = BlockAllocator(num_blocks)
        self.max_blocks_per_layer = -(-max_model_len // self.block_size) + 1
        self.block_tables = torch.zeros(
            layout.num_layers, max_num_seqs, self.max_blocks_per_layer, dtype=torch.int32, device=device
        )
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.seqs: dict[str, SequenceKV] = {}
        self._offsets = torch.arange(self.block_size, device=device)

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    @property
    def used_bytes(self) -> int:
        return self.allocator.num_used * self.layout.block_bytes

    @property
    def capacity_bytes(self) -> int:
        return self.allocator.num_blocks * self.layout.block_bytes

    def seq_bytes(self, seq_id: str) -> int:
        seq = self.seqs.get(seq_id)
        return 0 if seq is None else seq.num_blocks * self.layout.block_bytes

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.allocator.num_free

    # -- lifecycle --------------------------------------------------------------------------------
    def open(self, seq_id: str) -> SequenceKV:
        """Give ``seq_id`` a table row and empty per-layer tables."""
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already holds KV")
        if not self._free_rows:
            raise OutOfBlocks("no free block-table row (max_num_seqs sequences already hold KV)")
        seq = SequenceKV(
            row=self._free_rows.pop(),
            tables=[[] for _ in range(self.layout.num_layers)],
            lengths=[0] * self.layout.num_layers,
        )
        self.seqs[seq_id] = seq
        return seq

    def free(self, seq_id: str) -> int:
        """Return all blocks of ``seq_id`` to the pool; returns how many were freed."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return 0
        freed = 0
        for table in seq.tables:
            self.allocator.release(table)
            freed += len(table)
        self._free_rows.append(seq.row)
        return freed

    # -- prefill ----------------------------------------------------------------------------------
    def allocate_tokens(self, seq_id: str, layer: int, num_tokens: int) -> torch.Tensor:
        """Allocate blocks for ``num_tokens`` tokens of an empty layer and return their flat slots ``(num_tokens,)``."""
        seq = self.seqs[seq_id]
        if num_tokens < 0:
            raise ValueError(f"cannot allocate {num_tokens} tokens")
        if seq.lengths[layer]:
            raise ValueError(f"layer {layer} of {seq_id!r} is not empty")
        n_blocks = -(-num_tokens // self.block_size)
        if n_blocks > self.max_blocks_per_layer:
            raise OutOfBlocks(f"{num_tokens} tokens exceed max_model_len for one layer")
        blocks = self.allocator.allocate(n_blocks)
        seq.tables[layer] = blocks
        seq.lengths[layer] = num_tokens
        table = torch.tensor(blocks, dtype=torch.int32)
        self.block_tables[layer, seq.row, :n_blocks] = table.to(self.block_tables.device)
        slots = (table.long()[:, None] * self.block_size + torch.arange(self.block_size)).reshape(-1)[
            :num_tokens
        ]
        return slots.to(self.block_tables.device)

    # -- decode -----------------------------------------------------------------------------------
    # These run at every decode step over every (sequence, layer) pair: they read the lengths of the batch
    # as one array (one C-level conversion) instead of looping in Python, which grew with batch x layers.
    def _lengths_array(self, seq_ids: list[str]) -> np.ndarray:
        """``(B, num_layers)`` tokens held per sequence and layer."""
        return np.array([self.seqs[sid].lengths for sid in seq_ids], dtype=np.int64).reshape(
            len(seq_ids), self.layout.num_layers
        )

    def blocks_to_append(self, seq_ids: list[str]) -> int:
        """New blocks needed to add one token to every layer of every sequence."""
        return int((self._lengths_array(seq_ids) % self.block_size == 0).sum())

    def can_append(self, seq_ids: list[str]) -> bool:
        return self.blocks_to_append(seq_ids) <= self.allocator.num_free

    def append_slots(self, seq_ids: list[str]) -> torch.Tensor:
        """Reserve room for one more token in every layer of every sequence.

        Returns
        -------
        torch.LongTensor
            ``(num_layers, B)`` flat slot of the new token, per layer and sequence.
        """
        bs, device = self.block_size, self.block_tables.device
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"append_slots got a sequence twice: {seq_ids}")
        seqs = [self.seqs[sid] for sid in seq_ids]
        lengths = self._lengths_array(seq_ids)
        full = lengths % bs == 0  # (B, L): the layers whose last block is full
        needed = int(full.sum())
        if needed > self.allocator.num_free:
            raise OutOfBlocks(f"decode needs {needed} KV blocks, {self.allocator.num_free} free")
        if needed:
            full_rows, full_layers = (index.tolist() for index in full.nonzero())
            # checked before anything changes: the device block table has no column more
            for b, layer in zip(full_rows, full_layers, strict=True):
                if len(seqs[b].tables[layer]) >= self.max_blocks_per_layer:
                    raise OutOfBlocks(f"{seq_ids[b]!r} would exceed max_model_len in a layer")
            blocks = self.allocator.allocate(needed)
            columns = []
            for block, b, layer in zip(blocks, full_rows, full_layers, strict=True):
                table = seqs[b].tables[layer]
                columns.append(len(table))
                table.append(block)
            index = torch.tensor([full_layers, [seqs[b].row for b in full_rows], columns], device=device)
            self.block_tables[index[0], index[1], index[2]] = torch.tensor(
                blocks, dtype=torch.int32, device=device
            )
        for seq, row in zip(seqs, (lengths + 1).tolist(), strict=True):
            seq.lengths[:] = row
        # The new token of layer l goes to column length // bs of its row, which the tables now hold.
        rows = torch.tensor([seq.row for seq in seqs], dtype=torch.long, device=device)
        position = torch.from_numpy(np.ascontiguousarray(lengths.T)).to(device)  # (L, B)
        layers = torch.arange(self.layout.num_layers, device=device)[:, None]
        blocks_of_token = self.block_tables[layers, rows[None, :], position // bs].long()
        return blocks_of_token * bs + position % bs

    def extend_slots(self, seq_id: str, num_tokens: int) -> torch.Tensor:
        """Reserve room for ``num_tokens`` more tokens in every layer of one sequence (a preempted
        sequence's generated tokens fed back in one forward). All or nothing: :class:`OutOfBlocks` is
        raised before anything changes.

        Returns
        -------
        torch.LongTensor
            ``(num_layers, num_tokens)`` flat slots of the new tokens, per layer, in order.
        """
        if num_tokens < 1:
            raise ValueError(f"cannot extend by {num_tokens} tokens")
        seq, bs = self.seqs[seq_id], self.block_size
        new_blocks = [
            -(-(length + num_tokens) // bs) - len(table)
            for length, table in zip(seq.lengths, seq.tables, strict=True)
        ]
        if any(
            len(table) + n > self.max_blocks_per_layer
            for table, n in zip(seq.tables, new_blocks, strict=True)
        ):
            raise OutOfBlocks(f"{seq_id!r} would exceed max_model_len in a layer")
        needed = sum(new_blocks)
        if needed > self.allocator.num_free:
            raise OutOfBlocks(
                f"extending {seq_id!r} by {num_tokens} tokens needs {needed} KV blocks, "
                f"{self.allocator.num_free} free"
            )
        blocks = self.allocator.allocate(needed)
        slots = []
        for layer, n in enumerate(new_blocks):
            table = seq.tables[layer]
            taken, blocks = blocks[:n], blocks[n:]
            if taken:
                self.block_tables[layer, seq.row, len(table) : len(table) + n] = torch.tensor(
                    taken, dtype=torch.int32, device=self.block_tables.device
                )
                table.extend(taken)
            start = seq.lengths[layer]
            seq.lengths[layer] = start + num_tokens
            slots.append(self.layer_slots(seq_id, layer, start, start + num_tokens))
        return torch.stack(slots)

    def layer_slots(self, seq_id: str, layer: int, start: int, end: int) -> torch.Tensor:
        """Flat slots of tokens ``[start, end)`` of one layer of one sequence, ``(end - start,)``."""
        table = torch.tensor(self.seqs[seq_id].tables[layer], dtype=torch.long)
        pos = torch.arange(start, end)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        return slots.to(self.block_tables.device)

    def truncate(self, seq_id: str, layer: int, new_length: int) -> int:
        """Drop the tokens of ``layer`` beyond ``new_length`` and free the blocks no longer needed."""
        seq = self.seqs[seq_id]
        if not 0 <= new_length <= seq.lengths[layer]:
            raise ValueError(f"truncate needs 0 <= new_length <= {seq.lengths[layer]}, got {new_length}")
        keep_blocks = -(-new_length // self.block_size)
        table = seq.tables[layer]
        freed = table[keep_blocks:]
        del table[keep_blocks:]
        self.allocator.release(freed)
        seq.lengths[layer] = new_length
        return len(freed)

    # -- reading -------------------------------------------------------------------------------------
    def lengths(self, seq_ids: list[str]) -> list[list[int]]:
        """``[layer][b]`` tokens held."""
        return self._lengths_array(seq_ids).T.tolist()

    def gather_index(
        self, seq_ids: list[str], layer: int, lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat slots of every held token of ``layer``, padded to the longest sequence.

        Returns
        -------
        slots : torch.LongTensor
            ``(B, L_max)``; padding points at slot 0.
        valid : torch.BoolTensor
            ``(B, L_max)``.
        """
        device = self.block_tables.device
        max_len = max(lengths)
        n_blocks = -(-max_len // self.block_size)
        rows = torch.tensor([self.seqs[sid].row for sid in seq_ids], device=device)
        tables = self.block_tables[layer].index_select(0, rows)[:, :n_blocks].long()
        slots = (tables[:, :, None] * self.block_size + self._offsets).reshape(len(seq_ids), -1)[:, :max_len]
        valid = torch.arange(max_len, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return slots.masked_fill(~valid, 0), valid

    def rows(self, seq_ids: list[str]) -> torch.Tensor:
        """``(B,)`` block-table rows of ``seq_ids`` (a decode step computes them once for all its layers)."""
        return torch.tensor(
            [self.seqs[sid].row for sid in seq_ids], dtype=torch.long, device=self.block_tables.device
        )

    def gather_blocks_index(
        self, seq_ids: list[str], layer: int, lengths: list[int], rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids of every held token of ``layer`` (for :meth:`KVPool.gather_blocks`), padded to the longest.

        ``rows``: :meth:`rows` of ``seq_ids``, when the caller has it already.

        Returns
        -------
        tables : torch.LongTensor
            ``(B, n_max)`` with ``n_max = ceil(max(lengths) / block_size)``; entries past a sequence's own
            blocks are stale ids (valid indices, masked by ``valid``).
        valid : torch.BoolTensor
            ``(B, n_max * block_size)``: token ``i`` of row ``b`` is held.
        """
        device = self.block_tables.device
        n_blocks = -(-max(lengths) // self.block_size)
        if rows is None:
            rows = self.rows(seq_ids)
        tables = self.block_tables[layer].index_select(0, rows)[:, :n_blocks].long()
        positions = torch.arange(n_blocks * self.block_size, device=device)
        valid = positions[None, :] < torch.tensor(lengths, device=device)[:, None]
        return tables, valid

    def block_table(self, seq_ids: list[str], layer: int, max_len: int) -> torch.Tensor:
        """``(B, ceil(max_len / block_size))`` int32 block table of ``layer`` (flash-attn's paged layout)."""
        device = self.block_tables.device
        rows = torch.tensor([self.seqs[sid].row for sid in seq_ids], device=device)
        return (
            self.block_tables[layer].index_select(0, rows)[:, : -(-max_len // self.block_size)].contiguous()
        )

    def check_consistency(self) -> None:
        """Raise if the allocator and the tables disagree (tests call it)."""
        held = [b for seq in self.seqs.values() for t in seq.tables for b in t]
        assert len(held) == len(set(held)), "a block is held twice"
        assert len(held) == self.allocator.num_used, "allocator and tables disagree"
        for seq in self.seqs.values():
            for layer, (table, length) in enumerate(zip(seq.tables, seq.lengths, strict=True)):
                assert len(table) == -(-length // self.block_size), (
                    f"layer {layer}: {len(table)} blocks for {length} tokens"
                )
