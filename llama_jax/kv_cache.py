"""The KV cache: an explicit pytree that goes into the model and comes back updated.

Keys are stored already rotated. Row `b` holds `lengths[b]` valid entries in slots
`0 .. lengths[b]-1`; a forward pass over `T` new tokens writes them at slots
`lengths[b] .. lengths[b]+T-1` and advances `lengths[b]` by the number of non-padding tokens
(segment id != 0), so rows of a ragged batch advance independently.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig

CACHE_AXES = ("cache_layers", "cache_batch", "cache_sequence", "cache_kv_heads", "cache_head_dim")


class KVCache(NamedTuple):
    k: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    v: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(
        cls, config: LlamaConfig, batch: int, max_len: int, dtype: str | None = None
    ) -> KVCache:
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        dt = jnp.dtype(dtype or config.compute_dtype)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch,), jnp.int32))

    @classmethod
    def abstract(
        cls, config: LlamaConfig, batch: int, max_len: int, dtype: str | None = None
    ) -> KVCache:
        return jax.eval_shape(lambda: cls.zeros(config, batch, max_len, dtype))


PAGED_AXES = ("cache_layers", "cache_kv_heads", "cache_blocks", "cache_block", "cache_head_dim")


class PagedKVCache(NamedTuple):
    """A KV cache in fixed-size blocks shared by all sequences, and the view of one batch.

    `k`/`v` are the pool, [layers, kv_heads, blocks, block_size, head_dim]: heads first within a
    layer, so one (layer, head)'s blocks are [blocks, block_size, head_dim] pages, the layout
    the Pallas paged-attention kernel reads (`llama_jax.paged_attention`). Row `b` of a batch
    holds `lengths[b]` tokens, token `i` in block `block_tables[b, i // block_size]` at offset
    `i % block_size`. Entries past a row's blocks are `blocks` (one past the last block): writes
    there are dropped, so padding tokens never touch another sequence's blocks. The table is
    only as wide as the batch needs, so attention reads only the blocks its rows hold.
    """

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array  # int32 [batch, width]
    lengths: jax.Array  # int32 [batch]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def pool_zeros(
        config: LlamaConfig, num_blocks: int, block_size: int, dtype: str | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """An empty pool (k, v)."""
        shape = (config.n_layers, config.n_kv_heads, num_blocks, block_size, config.head_dim)
        dt = jnp.dtype(dtype or config.compute_dtype)
        return jnp.zeros(shape, dt), jnp.zeros(shape, dt)
