"""The preallocated KV memory pool: fixed-size blocks shared by all layers and sequences.

A block holds ``block_size`` tokens of ONE layer (keys and values). Any block serves any layer, so a
layer that ZipVL prunes hard simply takes fewer blocks, and the blocks it did not take serve other
requests. Tensors use flash-attn's paged layout ``(num_blocks, block_size, num_kv_heads, head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """Geometry of the pool.

    Attributes
    ----------
    num_layers, num_kv_heads, head_dim, block_size : int
    dtype : torch.dtype
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def element_size(self) -> int:
        # No tensor allocation: the engine reads this for every sequence in every stats snapshot.
        return self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """Key + value bytes of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def block_bytes(self) -> int:
        """Key + value bytes of one block (one layer)."""
        return self.block_size * self.token_bytes

    def blocks_for_bytes(self, nbytes: int) -> int:
        return max(0, nbytes // self.block_bytes)


class KVPool:
    """Key and value block tensors, ``(num_blocks, block_size, num_kv_heads, head_dim)`` each.

    Parameters
    ----------
    layout : KVLayout
    num_blocks : int
    device : torch.device
    """

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block (got {num_blocks}); raise kv_cache_bytes")
        self.layout = layout
        self.num_blocks = num_blocks
        shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
        self.keys = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.values = torch.zeros(shape, dtype=layout.dtype, device=device)
        # Reused by gather_blocks: decode gathers several MiB per layer and step, and a fresh buffer each
        # time costs page faults (on a CPU VM they made the gather up to 6x slower, depending on whether
        # malloc served the buffer from fresh pages).
        self._workspace: list[torch.Tensor] = [
            torch.empty((0, *shape[1:]), dtype=layout.dtype, device=device) for _ in range(2)
        ]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.layout.block_bytes

    @property
    def nbytes(self) -> int:
        """Bytes actually allocated by the two tensors (equals ``capacity_bytes``)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def flat_keys(self) -> torch.Tensor:
        """``(num_blocks * block_size, num_kv_heads, head_dim)`` view."""
        return self.keys.view(-1, self.layout.num_kv_heads, self.layout.head_dim)

    def flat_values(self) -> torch.Tensor:
        return self.values.view(-1, self.layout.num_kv_heads, self.layout.head_dim)

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens at flat slots (``block * block_size + offset``).

        Parameters
        ----------
        slots : torch.LongTensor
            ``(t,)``.
        keys, values : torch.Tensor
            ``(t, num_kv_heads, head_dim)``.
        """
        self.flat_keys().index_copy_(0, slots, keys.to(self.keys.dtype))
        self.flat_values().index_copy_(0, slots, values.to(self.values.dtype))

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Read tokens at flat ``slots`` of any shape ``S``; returns ``(*S, num_kv_heads, head_dim)`` twice."""
        flat = slots.reshape(-1)
        k = (
            self.flat_keys()
            .index_select(0, flat)
            .view(*slots.shape, self.layout.num_kv_heads, self.layout.head_dim)
        )
        v = (
            self.flat_values()
            .index_select(0, flat)
            .view(*slots.shape, self.layout.num_kv_heads, self.layout.head_dim)
        )
        return k, v

    def gather_blocks(
        self, tables: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Read whole blocks: one contiguous copy of ``block_size`` tokens per index instead of one per token.

        On the CPU the result lives in a workspace the pool reuses (valid until the next ``gather_blocks``
        call: the decode step uses it for one layer's attention, then gathers the next layer); it grows to
        1.25x the largest gather and stays, outside ``kv_cache_bytes``. On a GPU the caching allocator
        already reuses memory, so each call returns new tensors and nothing is kept.

        Parameters
        ----------
        tables : torch.LongTensor
            ``(B, n)`` block ids.
        valid : torch.BoolTensor, optional
            ``(B, n * block_size)``: the positions that hold a token. The others (the unused tail of a
            sequence's last block, padding blocks) are zeroed, so that whatever a freed block last held
            (even a non-finite value) cannot reach the attention: a boolean mask does not stop
            ``0 x inf = nan``.

        Returns
        -------
        keys, values : torch.Tensor
            ``(B, n * block_size, num_kv_heads, head_dim)``: token ``i`` of row ``b`` is at offset ``i`` of
            its blocks in order.
        """
        shape = (tables.shape[0], -1, self.layout.num_kv_heads, self.layout.head_dim)
        flat = tables.reshape(-1)
        n = flat.numel()
        if self.device.type == "cpu":
            if self._workspace[0].shape[0] < n:  # grown with a margin, never shrunk
                capacity = max(n, self._workspace[0].shape[0] * 5 // 4)
                self._workspace = [
                    torch.empty((capacity, *self.keys.shape[1:]), dtype=self.keys.dtype, device=self.device)
                    for _ in range(2)
                ]
            k = torch.index_select(self.keys, 0, flat, out=self._workspace[0][:n])
            v = torch.index_select(self.values, 0, flat, out=self._workspace[1][:n])
        else:
            k, v = self.keys.index_select(0, flat), self.values.index_select(0, flat)
        k, v = k.view(shape), v.view(shape)
        if valid is not None:
            empty = (~valid).reshape(-1).nonzero().squeeze(1)
            if empty.numel():
                tokens = (-1, self.layout.num_kv_heads, self.layout.head_dim)
                k.view(tokens).index_fill_(0, empty, 0)
                v.view(tokens).index_fill_(0, empty, 0)
        return k, v


def pool_blocks(
    layout: KVLayout, kv_cache_bytes: int | None, gpu_memory_utilization: float, device: torch.device
) -> int:
    """Number of blocks for a pool of ``kv_cache_bytes`` (or a share of free GPU memory, or 256 MiB on CPU)."""
    if kv_cache_bytes is None:
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            kv_cache_bytes = int(free * gpu_memory_utilization)
        else:
            kv_cache_bytes = 256 * 1024 * 1024
    return layout.blocks_for_bytes(kv_cache_bytes)
