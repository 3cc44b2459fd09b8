"""Decode attention over the paged KV pool through the Pallas paged-attention kernel (TPU).

Why: the XLA path (`LayerCache.keys_values`) gathers every row's blocks of a layer into a
contiguous copy of k and v before attending (for Llama 3.1-8B, 4 x 131072 tokens on 4 chips,
0.54 GB per chip and layer). The kernel (`jax.experimental.pallas.ops.tpu.paged_attention`)
instead copies each row's pages from HBM into VMEM itself, a few pages at a time, as far as the
row's length, and never materialises the gathered keys.

The kernel takes one layer's pages as [kv_heads, pages, page_size, head_dim] and walks heads by
its grid index, so a per-layer slice of the pool would be copied out of the scanned carry
before every call. The pool is heads-first per layer, [layers, kv_heads, blocks, block_size,
head_dim], so on each device it is, without a copy, one array of `layers * kv_heads * blocks`
pages of a single "head": each (row, KV head) pair becomes a row of the kernel's batch, its
page indices offset to its layer and head, its queries the heads of its group.

Decode only (one new token per row), and the token must already be in the pool: the caller
writes first and passes each row's length after the write. Under a sharding resolver the kernel
runs per device in a `shard_map`: rows split as the batch is, query and KV heads over the same
mesh axes (the pool's `cache_kv_heads` rule), the pool whole on each device otherwise.

Float pools only: an int8 pool (`QuantizedKV`) takes the XLA gather (see
`model.cached_attention_kernel`), because the kernel's quantized mode reads scales broadcast
to the pages' full shape, an HBM array at least as large as the int8 pages.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as _kernel
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.kv_cache import PAGED_AXES
from llama_jax.partitioning import BATCH, HEADS, sharding_for

COMPUTE_BLOCK = 512  # tokens of k and v the kernel attends to per step (its VMEM tile)


def pages_per_compute_block(width: int, block_size: int) -> int:
    """Pages per kernel step: at most `COMPUTE_BLOCK` tokens, and a divisor of the table's
    `width` (the kernel's requirement)."""
    return math.gcd(width, max(1, COMPUTE_BLOCK // block_size))


def _split(sharding: NamedSharding | None, dim: int) -> tuple[str, ...]:
    """The mesh axes dimension `dim` of `sharding` is split over (() when whole)."""
    if sharding is None:
        return ()
    spec = sharding.spec
    axes = spec[dim] if dim < len(spec) else None
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def suits(time: int, head_dim: int, n_heads: int, n_kv_heads: int) -> bool:
    """Whether `attention="auto"` should take the kernel for a paged cache: one new token per
    row, 128-lane heads, and (under a sharding resolver) query and KV heads split over the
    same mesh axes in whole groups, so each device holds the KV heads of its query heads."""
    if time != 1 or head_dim % 128 or n_heads % n_kv_heads:
        return False
    q_sh, kv_sh = sharding_for((BATCH, None, HEADS, None)), sharding_for(PAGED_AXES)
    if not isinstance(q_sh, NamedSharding) or not isinstance(kv_sh, NamedSharding):
        return q_sh is None and kv_sh is None
    heads, kv_heads = _split(q_sh, 2), _split(kv_sh, 1)
    if heads != kv_heads:
        return False
    n = math.prod(q_sh.mesh.shape[a] for a in heads)
    return n_kv_heads % n == 0 and not any(_split(kv_sh, d) for d in (0, 2, 3, 4))


def paged_decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    layer: jax.Array | int,
    table: jax.Array,
    lengths: jax.Array,
) -> jax.Array:
    """Attention of one new token per row over its blocks: q [batch, 1, heads, head_dim], the
    pool k and v [layers, kv_heads, blocks, block_size, head_dim] (this call's tokens already
    written), `table` [batch, width] block ids inside the pool, `lengths` [batch] keys each row
    attends to (>= 1, <= width * block_size) -> [batch, 1, heads, head_dim]."""
    if q.shape[1] != 1:
        raise ValueError(f"paged decode attention takes one token per row, got {q.shape[1]}")
    hd = q.shape[3]
    q = q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)  # the kernel does not scale the scores
    layer = jnp.asarray(layer, jnp.int32)
    ppcb = pages_per_compute_block(table.shape[1], k.shape[3])

    def per_device(q, k, v, layer, table, lengths):
        b, _, heads, _ = q.shape
        n_layers, kv, blocks, bs, _ = k.shape
        g = heads // kv
        # one "head" of layers * kv * blocks pages: a bitcast of the heads-first pool
        k_pages = k.reshape(1, n_layers * kv * blocks, bs, hd)
        v_pages = v.reshape(1, n_layers * kv * blocks, bs, hd)
        first = (layer * kv + jnp.arange(kv, dtype=jnp.int32)) * blocks  # [kv]
        pages = (first[None, :, None] + table[:, None, :]).reshape(b * kv, -1)
        out = _kernel(
            q.reshape(b * kv, g, hd),
            k_pages,
            v_pages,
            jnp.repeat(lengths.astype(jnp.int32), kv),
            pages,
            pages_per_compute_block=ppcb,
        )
        return out.reshape(b, 1, heads, hd)

    q_sh = sharding_for((BATCH, None, HEADS, None))
    if not isinstance(q_sh, NamedSharding):
        return per_device(q, k, v, layer, table, lengths)
    pool_sh = sharding_for(PAGED_AXES)
    rows = PartitionSpec(*q_sh.spec[:1])
    mapped = jax.shard_map(
        per_device,
        mesh=q_sh.mesh,
        in_specs=(q_sh.spec, pool_sh.spec, pool_sh.spec, PartitionSpec(), rows, rows),
        out_specs=q_sh.spec,
        check_vma=False,
    )
    return mapped(q, k, v, layer, table, lengths)
