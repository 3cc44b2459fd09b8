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
