"""The paged KV store: a preallocated pool of blocks and per-(sequence, layer) block tables."""

from zipvl_ray.kv.block_manager import BlockAllocator, KVCacheManager, OutOfBlocks, SequenceKV
from zipvl_ray.kv.pool import KVLayout, KVPool, pool_blocks

__all__ = [
    "BlockAllocator",
    "KVCacheManager",
    "KVLayout",
    "KVPool",
    "OutOfBlocks",
    "SequenceKV",
    "pool_blocks",
]
