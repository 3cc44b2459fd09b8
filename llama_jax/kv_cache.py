"""The KV cache: an explicit pytree that goes into the model and comes back updated.

Keys are stored already rotated. Row `b` holds `lengths[b]` valid entries in slots
`0 .. lengths[b]-1`; a forward pass over `T` new tokens writes them at slots
`lengths[b] .. lengths[b]+T-1` and advances `lengths[b]` by the number of non-padding tokens
(segment id != 0), so rows of a ragged batch advance independently.

k and v are each an array in a float dtype (the compute dtype by default) or, with
`dtype="int8"`, a `QuantizedKV`: int8 values with one scale per token and KV head, quantized as
they are written (attention applies the scales as it reads), for about half the bytes of a
bfloat16 cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from llama_jax.config import LlamaConfig

CACHE_AXES = ("cache_layers", "cache_batch", "cache_sequence", "cache_kv_heads", "cache_head_dim")
QUANTIZED = "int8"  # the `dtype` that stores k and v as `QuantizedKV`
INT8_MAX = 127


class QuantizedKV(NamedTuple):
    """Keys or values as int8 with a per token, per KV head scale: `values * scale` (scale
    broadcast over head_dim) is the stored tensor. Symmetric: `scale = max|x| / 127` over the
    head_dim of each token and head, so every token keeps its own range (an outlier token
    costs its neighbours nothing) and the scales add 1/head_dim of the int8 bytes per scale
    byte. The scale's logical axes are the values' without the last (`scale_axes`), so the
    rule table shards both alike."""

    values: jax.Array  # int8, the float cache's shape [..., head_dim]
    scale: jax.Array  # the compute dtype, [...] (the values' shape without head_dim)

    @property
    def shape(self) -> tuple[int, ...]:
        """The values' shape: the shape of the float cache this stands for."""
        return self.values.shape


Stored = jax.Array | QuantizedKV  # one of a cache's k and v


def quantize(x: jax.Array, scale_dtype: jnp.dtype) -> QuantizedKV:
    """`x [..., head_dim]` rounded to int8 per token and head (scales in `scale_dtype`); an
    all-zero vector gets scale 0 and values 0. The values are rounded against the scale as
    stored, so `values * scale` is within half a step, `scale / 2`, of `x` in every element."""
    x32 = x.astype(jnp.float32)
    scale = (jnp.max(jnp.abs(x32), axis=-1) / INT8_MAX).astype(scale_dtype)
    step = scale.astype(jnp.float32)[..., None]
    values = jnp.round(x32 / jnp.where(step > 0, step, 1))
    return QuantizedKV(jnp.clip(values, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale)


def dequantize(x: QuantizedKV) -> jax.Array:
    """The tensor `x` stands for, in the scale's dtype (int8 -> float is exact). Attention
    never builds it (`model.grouped_attention` takes the scales); it defines what is stored."""
    return x.values.astype(x.scale.dtype) * x.scale[..., None]


def write(cache: Stored, at: tuple, x: jax.Array) -> Stored:
    """`cache` with `x` written at index `at` (which indexes every axis but head_dim):
    cast to a float cache's dtype, or quantized (values and scales at the same index)."""
    if isinstance(cache, QuantizedKV):
        q = quantize(x, cache.scale.dtype)
        return QuantizedKV(cache.values.at[at].set(q.values), cache.scale.at[at].set(q.scale))
    return cache.at[at].set(x.astype(cache.dtype))


def scale_axes(axes: tuple[str, ...]) -> tuple[str, ...]:
    """The logical axes of a `QuantizedKV`'s scale, given its values' (head_dim dropped)."""
    return axes[:-1]


def map_stored(fn: Callable[[jax.Array, tuple[str, ...]], Any], x: Stored, axes: tuple[str, ...]):
    """`fn(array, logical_axes)` over one of k and v: the array itself, or a `QuantizedKV`'s
    values and scale (a `QuantizedKV` of the results), e.g. to build its shardings."""
    if isinstance(x, QuantizedKV):
        return QuantizedKV(fn(x.values, axes), fn(x.scale, scale_axes(axes)))
    return fn(x, axes)


def stored_zeros(shape: tuple[int, ...], config: LlamaConfig, dtype: str | None) -> Stored:
    """An empty k or v of `shape`: float in `dtype` (default: the compute dtype), or for
    `QUANTIZED` int8 values with scales in the compute dtype."""
    if dtype == QUANTIZED:
        scale = jnp.zeros(shape[:-1], jnp.dtype(config.compute_dtype))
        return QuantizedKV(jnp.zeros(shape, jnp.int8), scale)
    return jnp.zeros(shape, jnp.dtype(dtype or config.compute_dtype))


class KVCache(NamedTuple):
    k: Stored  # [layers, batch, max_len, kv_heads, head_dim]
    v: Stored  # [layers, batch, max_len, kv_heads, head_dim]
    lengths: jax.Array  # [batch] int32

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def zeros(
        cls, config: LlamaConfig, batch: int, max_len: int, dtype: str | None = None
    ) -> KVCache:
        """An empty cache; `dtype`: a float dtype (default: the compute dtype) or `QUANTIZED`."""
        shape = (config.n_layers, batch, max_len, config.n_kv_heads, config.head_dim)
        k, v = stored_zeros(shape, config, dtype), stored_zeros(shape, config, dtype)
        return cls(k, v, jnp.zeros((batch,), jnp.int32))

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

    k: Stored
    v: Stored
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
    ) -> tuple[Stored, Stored]:
        """An empty pool (k, v); `dtype` as `KVCache.zeros` takes it."""
        shape = (config.n_layers, config.n_kv_heads, num_blocks, block_size, config.head_dim)
        return stored_zeros(shape, config, dtype), stored_zeros(shape, config, dtype)
